"""The certificate's statistics (kdq.stats, kdq.parity's gates) against answers known in advance: synthetic paired
predictions with a known drop, a McNemar p and a Wilson bound worked out by hand, and the cases a vacuous gate
would pass."""

import math

import numpy as np
import pytest

from kdq import stats
from kdq.parity import FLOAT, REFERENCE, agreement, certificate_verdict, check_gates, format_gates, paired_counts
from kdq.stats import FAIL, NOT_PROVEN, PASS, Paired


def outcomes(n: int, b: int, c: int, accuracy: float = 0.85, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per-image correctness of a reference and a candidate on `n` images: b images only the reference gets
    right, c only the candidate, the rest both right or both wrong (shuffled)."""
    both = round(accuracy * n) - b
    ref = np.array([1] * b + [0] * c + [1] * both + [0] * (n - b - c - both), bool)
    cand = np.array([0] * b + [1] * c + [1] * both + [0] * (n - b - c - both), bool)
    order = np.random.default_rng(seed).permutation(n)
    return ref[order], cand[order]


def report_of(ref_ok: np.ndarray, cand_ok: np.ndarray, labels: np.ndarray | None = None) -> dict:
    """A parity report as kdq.parity builds it from per-image outcomes: float model vs PyTorch int8."""
    labels = np.zeros(len(ref_ok), int) if labels is None else labels
    classes = int(labels.max()) + 1
    correct = {FLOAT: ref_ok, REFERENCE: cand_ok}
    return {"classes": [str(c) for c in range(classes)], "test_samples": len(ref_ok),
            "accuracy": {k: float(v.mean()) for k, v in correct.items()},
            "paired": paired_counts(correct, labels, classes)}  # fmt: skip


def drop_check(n: int, b: int, c: int, bound: float = 0.005) -> dict:
    (check,) = check_gates(report_of(*outcomes(n, b, c)), {"int8_accuracy_drop_max": bound})
    return check


def test_a_known_drop_is_failed_passed_or_not_proven_by_what_the_images_can_prove():
    """2% of 10,000 images discordant; the bound is 0.5 pt."""
    lost = drop_check(10_000, 150, 50)  # 1 pt lost: the whole interval is beyond 0.5 pt
    assert lost["verdict"] == FAIL and lost["value"] == pytest.approx(0.01) and lost["ci"][0] > 0.005
    fine = drop_check(10_000, 105, 95)  # 0.1 pt lost: the whole interval is within 0.5 pt
    assert fine["verdict"] == PASS and fine["ci"][1] <= 0.005 and fine["p"] <= stats.ALPHA and fine["n"] == 10_000
    small = drop_check(360, 4, 4)  # the same rates on the demo's 360 images (1 image = 0.28 pt)
    assert small["verdict"] == NOT_PROVEN and not small["passed"]
    assert small["ci"][0] < 0.005 < small["ci"][1] and small["images_needed"] > 360
    # ... and the images it names do prove it, one percent fewer do not
    needed = small["images_needed"]
    assert drop_check(needed, round(4 * needed / 360), round(4 * needed / 360))["verdict"] == PASS


def test_no_discordant_image_still_leaves_an_interval():
    """Wilson's upper bound for 0 of n at 97.5% is z^2 / (n + z^2), z = 2.2414 (worked by hand): on 360 images
    that is 1.38 pt, so even identical predictions cannot prove a 1 pt bound there."""
    z = 2.241402727604947
    lo, hi = stats.drop_interval(Paired(0, 0, 360))
    assert hi == pytest.approx(z * z / (360 + z * z), rel=1e-6) and lo == pytest.approx(-hi)
    demo = stats.drop_within(Paired(0, 0, 360), 0.01)  # README: "about 500 images would prove it"
    assert demo.verdict == NOT_PROVEN and 480 <= demo.images_needed <= 520
    assert stats.drop_within(Paired(0, 0, 10_000), 0.01).verdict == PASS


def test_mcnemar_is_the_exact_binomial_test_of_the_discordant_images():
    """b = 10, c = 2: p = 2 * P(X <= 2 | 12, 1/2) = 2 * (1 + 12 + 66) / 4096, by hand."""
    assert stats.mcnemar_p(Paired(10, 2, 100)) == pytest.approx(2 * 79 / 4096)
    assert stats.mcnemar_p(Paired(0, 0, 100)) == 1.0
    ref, cand = outcomes(1000, 10, 2)
    (check,) = check_gates(report_of(ref, cand), {"int8_accuracy_drop_max": 0.05})
    assert check["mcnemar_p"] == pytest.approx(2 * 79 / 4096)


def test_p_value_and_interval_tell_the_same_story():
    for b, c, n in ((105, 95, 10_000), (150, 50, 10_000), (4, 4, 360), (30, 0, 1000)):
        result = stats.drop_within(Paired(b, c, n), 0.005)
        assert (result.p <= stats.ALPHA) == (result.verdict == PASS), (b, c, n, result)


def test_zero_confident_images_is_not_proven_never_a_pass():
    ref = np.zeros((50, 3), np.float32)  # every top-2 margin is 0: no confident image
    a = agreement(ref, ref, margin=0.5)
    assert a["confident_samples"] == 0
    report = {"agreement": {"onnxruntime": a}}
    (check,) = check_gates(report, {"ort_confident_flip_rate_max": 0.01})
    assert check["verdict"] == NOT_PROVEN and not check["passed"] and "no image" in check["reason"]
    assert certificate_verdict([check]) == "not proven"


def test_confident_margin_is_relative_to_the_logit_scale():
    """The same logits at 8x the scale (a KD student's) have the same confident images."""
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((400, 10)).astype(np.float32)
    other = ref + 0.3 * rng.standard_normal(ref.shape).astype(np.float32)
    small, large = agreement(ref, other, 0.5), agreement(8 * ref, 8 * other, 0.5)
    assert 0 < small["confident_samples"] == large["confident_samples"] < 400
    assert small["confident_flips"] == large["confident_flips"] and small["flips"] == large["flips"] > 0


def test_flip_rate_is_bounded_by_its_interval():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((10_000, 10)).astype(np.float32)
    other = ref.copy()
    other[:100] = other[:100, ::-1]  # 1% of images change their top-1 (reversed logits)
    a = agreement(ref, other, 0.5)
    assert a["flips"] == 100
    (ok,) = check_gates({"agreement": {"onnxruntime": a}}, {"ort_flip_rate_max": 0.02})
    (bad,) = check_gates({"agreement": {"onnxruntime": a}}, {"ort_flip_rate_max": 0.005})
    assert ok["verdict"] == PASS and ok["ci"][0] < 0.01 < ok["ci"][1] <= 0.02 and bad["verdict"] == FAIL
    few = {"agreement": {"onnxruntime": agreement(ref[:300], other[:300], 0.5)}}  # 100 of 300 flip
    assert check_gates(few, {"ort_flip_rate_max": 0.02})[0]["verdict"] == FAIL


def test_a_class_gate_means_the_same_at_36_images_a_class_and_at_1000():
    """10 classes; one loses 10 pt, the others nothing. A 5 pt bound: at 1,000 images a class the loss is proven
    (after Holm); at 36 a class it is not proven, and never a pass."""
    for per_class, verdict in ((1000, FAIL), (36, NOT_PROVEN)):
        refs, cands, labels = [], [], []
        for cls in range(10):
            lost = round(0.10 * per_class) if cls == 7 else 0
            ref, cand = outcomes(per_class, lost, 0, accuracy=0.9, seed=cls)
            refs.append(ref), cands.append(cand), labels.append(np.full(per_class, cls))
        report = report_of(np.concatenate(refs), np.concatenate(cands), np.concatenate(labels))
        checks = {c["name"]: c for c in check_gates(report, {"class_drop_max": 0.05, "int8_accuracy_drop_max": 0.02})}
        worst = checks[f"class_drop[{REFERENCE}]"]
        assert worst["verdict"] == verdict and "'7'" in worst["reason"], worst
        assert checks[f"int8_accuracy_drop[{REFERENCE}]"]["verdict"] != FAIL  # 1 pt overall hides the class


def test_holm_corrects_for_testing_every_class():
    """Ten classes each just provable alone are not all provable together."""
    one = Paired(0, 0, 200)  # p = 0.026 alone; Holm multiplies the smallest of ten by 10
    alone = stats.classes_within([one], 0.03)
    together = stats.classes_within([one] * 10, 0.03)
    assert alone[0] == PASS and together[0] == NOT_PROVEN
    assert together[2][0] == pytest.approx(min(1.0, 10 * stats.p_drop_within(one, 0.03)))


def test_every_statistical_gate_shows_its_interval_n_and_p():
    report = report_of(*outcomes(10_000, 105, 95))
    (check,) = check_gates(report, {"int8_accuracy_drop_max": 0.005})
    (row,) = format_gates([check])[2:]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[0] == f"int8_accuracy_drop[{REFERENCE}]" and cells[4] == "10000" and cells[6] == "✓"
    lo, hi = (float(x) for x in cells[2].strip("[]").split(","))
    assert lo < 0.001 < hi and float(cells[5]) == pytest.approx(check["p"], rel=0.05) and math.isfinite(lo)


def test_certificate_verdict_is_rejected_over_not_proven_over_certified():
    gates = [{"verdict": PASS}, {"verdict": NOT_PROVEN}]
    assert certificate_verdict(gates) == "not proven"
    assert certificate_verdict([*gates, {"verdict": FAIL}]) == "rejected"
    assert certificate_verdict(gates[:1]) == "certified"


def as_bits(ok: np.ndarray) -> str:
    return "".join("1" if x else "0" for x in ok)


def test_the_kd_gain_is_paired_and_called_a_tie_unless_its_interval_excludes_zero():
    """`kdq pipeline` and `kdq evaluate` print the KD student against the baseline on the same images: 300 images
    won and 50 lost of 10,000 is ahead; 60 won and 50 lost is a tie; 50 won and 300 lost is behind."""
    from kdq.evaluate import paired_gain

    def gain(won: int, lost: int):
        base, kd = outcomes(10_000, lost, won)
        return paired_gain({"baseline": {"correct": as_bits(base)}, "student": {"correct": as_bits(kd)}})

    ahead = gain(300, 50)
    assert ahead.value == pytest.approx(0.025) and ahead.n == 10_000 and ahead.verdict == "ahead"
    lo, hi = stats.drop_interval(Paired(50, 300, 10_000))
    assert ahead.ci == (-hi, -lo) and 0 < ahead.ci[0] < 0.025 < ahead.ci[1]
    assert ahead.p == pytest.approx(stats.mcnemar_p(Paired(50, 300, 10_000))) and ahead.p < 1e-30
    assert "+2.50 pt" in ahead.sentence() and "student is ahead" in ahead.sentence()
    tie = gain(60, 50)
    assert tie.verdict == "tie" and tie.ci[0] < 0 < tie.ci[1] and "a tie" in tie.sentence()
    assert gain(50, 300).verdict == "behind"
    assert paired_gain({"baseline": {"top1": 0.8}, "student": {"top1": 0.9}}) is None  # results from before
