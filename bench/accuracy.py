"""`make bench-accuracy`: the seed's table, measured on Fashion-MNIST's 10,000 real test images.

    uv run --frozen python -m bench.accuracy                          # fashion-mnist-cpu, 5 seeds (CPU, ~45 min)
    uv run --frozen python -m bench.accuracy --preset fashion-mnist   # all 60,000 training images (a GPU's job)

Method. Every model is trained by kdq's own stages (`kdq.recipes`) under one recipe (`--preset`; by default
`fashion-mnist-cpu`: the 3,000-image Fashion-MNIST shipped in kdq, a ResNet-32 teacher, MobileNetV2 x0.5 students,
the demo's recipe until 2026-12-04), with its
validation split (10% of the training images, stratified by seed) choosing each model's epoch; the numbers are
top-1 on the whole test split, which no stage reads.
- teacher: one seed (every student of a seed is taught by the same teacher);
- per seed (default 5): the no-KD baseline; Hinton KD with offline soft targets (teacher logits on unaugmented
  images); Hinton KD online (the teacher sees the student's augmented batch); DIST offline (Huang et al. 2022)
  blended with CE by the recipe's alpha like Hinton's term, and DIST as its paper weighs it (CE + beta * inter +
  gamma * intra, beta = gamma = 1: `--kd-weighting sum --alpha 1`);
- seed 0's offline KD student, made int8 for x86 by QAT-KD (the recipe's QAT) and by PTQ;
- both student layouts (mobilenet_v2 and mobilenet_v2_hires), seed 0's baseline recipe: float and PTQ int8 accuracy;
- ONNX Runtime int8 latency, batch 1 and 64, 1 thread: for each model and batch, the median of `--rounds`
  medians (30 runs at batch 1, 5 at batch 64, after 3 warm-up runs); the rounds interleave, each timing every
  model and batch in turn, so a slow spell of a shared machine is spread over all of them.
KD gain = KD student minus baseline of the same seed (same split, same initialisation): the mean of these paired
differences and its 95% t-interval over seeds (scipy), a tie unless the interval excludes zero; one seed's
accuracy has its Wilson interval on the test images; int8 drop = float minus int8 accuracy of the same model.
The teacher trains on seed 0's training part, so it has seen most validation images of the other seeds: their KD
students choose their epoch on images their teacher learnt (never on test images; the test numbers are
unaffected). Stages are resumable: an interrupted run continues from its checkpoints (`--out-dir`). Prints the
table; writes bench/results/accuracy-fashion-mnist-<time>.json (and -latest.json); README's tables are generated
from its committed copy, results/accuracy-fashion-mnist.json (`python -m bench.readme`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch

from bench.common import Table, environment, finish, print_table, write_results
from kdq import checkpoint as ck
from kdq.config import Preset, with_overrides
from kdq.data import Normalize, load_dataset
from kdq.evaluate import median_ms, predict_logits, state_dict_bytes
from kdq.export import export_onnx
from kdq.int8run import ort_session
from kdq.models import count_parameters
from kdq.parity import batched, ort_runner
from kdq.presets import PRESET_NAMES, get_preset
from kdq.quant import int8_model, is_quantized
from kdq.recipes import RunOptions, quantize_static, train_student, train_teacher
from kdq.stats import wilson
from kdq.train import CHECKPOINT

RESULTS_NAME = "accuracy-fashion-mnist"
ONNX_OPSET = 17
LATENCY_BATCHES = {1: 30, 64: 5}  # batch size: timed runs per round


def bench_preset(args: argparse.Namespace) -> Preset:
    """`--preset`, with the epochs and subset the options give (a tiny setting for tests)."""
    p = get_preset(args.preset)
    if args.teacher_epochs:
        p = with_overrides(p, teacher_optim=with_overrides(p.teacher_optim, epochs=args.teacher_epochs))
    if args.epochs:
        p = with_overrides(p, student_optim=with_overrides(p.student_optim, epochs=args.epochs))
    return with_overrides(p, train_subset=args.subset or None)


class Bench:
    def __init__(self, preset: Preset, out_dir: Path, data_dir: Path):
        self.preset, self.out = preset, out_dir
        self.opts = RunOptions(data_dir=data_dir, resume=True)
        splits = load_dataset(preset.dataset, data_dir, image_size=preset.image_size)
        self.test, self.train_images = splits.test, preset.train_subset or len(splits.train)
        self.seconds: dict[str, float] = {}

    def timed(self, name: str, make):
        t0 = time.perf_counter()
        path = make()
        self.seconds[name] = time.perf_counter() - t0
        print(f"[bench.accuracy] {name}: {self.seconds[name]:.0f} s", file=sys.stderr)
        return path

    def student(self, name: str, seed: int, **changes) -> Path:
        online = changes.pop("online", False)
        preset = with_overrides(self.preset, seed=seed, **changes)
        run = self.out / f"seed{seed}"
        teacher = self.out / "teacher" / CHECKPOINT
        return self.timed(
            f"{name} seed {seed}",
            lambda: train_student(preset, run, self.opts, stage=name, teacher_path=teacher, online=online),
        )

    def accuracy(self, path: Path) -> float:
        ckpt = ck.load_checkpoint(path)
        model = int8_model(ckpt, path) if is_quantized(ckpt) else ck.model_from_checkpoint(ckpt, path).eval()
        with torch.no_grad():
            logits = predict_logits(model, self.test.images, Normalize(**ckpt[ck.NORMALIZATION]))
        return float((logits.argmax(1) == self.test.labels).float().mean())

    def int8(self, path: Path, mode: str) -> Path:
        """seed's int8 model of the float checkpoint `path`: PTQ (calibrated) or QAT-KD (fine-tuned)."""
        if mode == "ptq":
            out = path.parent.parent / f"{path.parent.name}_ptq.pt"
            if not out.exists():
                p = self.preset.quant
                self.timed(f"ptq {path.parent.name}", lambda: quantize_static(path, out, self.opts, p.backend,
                                                                              p.calibration_batches))  # fmt: skip
            return out
        run = path.parent.parent
        return self.timed(
            "qat",
            lambda: train_student(
                self.preset,
                run,
                self.opts,
                stage="kd_offline_qat",
                qat=True,
                init=path,
                teacher_path=self.out / "teacher" / CHECKPOINT,
            ),  # fmt: skip
        )

    def ort(self, paths: dict[str, Path], rounds: int) -> dict[str, dict]:
        """ORT int8 test accuracy, file size and latency (1 thread, batch 1 and 64) of int8 checkpoints, by name.

        Latency rounds interleave: each round times every model at every batch size once (`LATENCY_BATCHES`)."""
        sessions, inputs, out = {}, {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, path in paths.items():
                ckpt = ck.load_checkpoint(path)
                model = int8_model(ckpt, path)
                onnx = Path(tmp) / f"{name}.onnx"
                export_onnx(model, onnx, ONNX_OPSET, ck.input_size(ckpt))
                sessions[name] = session = ort_session(str(onnx))  # one thread
                x = inputs[name] = Normalize(**ckpt[ck.NORMALIZATION])(self.test.images).contiguous().numpy()
                top1 = float((batched(ort_runner(session), x).argmax(1) == self.test.labels.numpy()).mean())
                out[name] = {"ort_int8_top1": top1, "onnx_bytes": onnx.stat().st_size,
                             "int8_bytes": state_dict_bytes(model)}  # fmt: skip
        timings: dict[tuple[str, int], list[float]] = {}
        for _ in range(rounds):
            for name, session in sessions.items():
                for batch, runs in LATENCY_BATCHES.items():
                    step = lambda s=session, xb=inputs[name][:batch]: s.run(None, {"input": xb})  # noqa: E731
                    timings.setdefault((name, batch), []).append(median_ms(step, 3, runs))
        for name in paths:
            out[name]["ort_int8_ms"] = {f"b{b}": float(np.median(timings[name, b])) for b in LATENCY_BATCHES}
        return out


def describe(path: Path) -> dict:
    ckpt = ck.load_checkpoint(path)
    model = ck.model_from_checkpoint(ckpt, path)
    return {
        "arch": ckpt[ck.ARCH]["name"],
        "parameters": count_parameters(model),
        "fp32_bytes": state_dict_bytes(model),
        "selected_epoch": ckpt.get(ck.SELECTED_EPOCH),
        "epochs": ckpt[ck.EPOCH],
    }


def run(args: argparse.Namespace) -> dict:
    preset = bench_preset(args)
    bench = Bench(preset, args.out_dir, args.data_dir)
    teacher = bench.timed("teacher", lambda: train_teacher(preset, args.out_dir, bench.opts))
    models: dict[str, dict] = {"teacher": {**describe(teacher), "top1": [bench.accuracy(teacher)]}}
    variants = {
        "baseline": dict(alpha=0.0),
        "kd_offline": dict(kd_loss="hinton", online=False),
        "kd_online": dict(kd_loss="hinton", online=True),
        "dist_offline": dict(kd_loss="dist", online=False),
        "dist_paper": dict(kd_loss="dist", kd_weighting="sum", alpha=1.0, online=False),
    }
    paths: dict[str, dict[int, Path]] = {name: {} for name in variants}
    for seed in range(args.seeds):  # seed by seed: a cut-short run still has complete seeds
        for name, changes in variants.items():
            paths[name][seed] = bench.student(name, seed, **changes)
        if seed == 0 and preset.student == "mobilenet_v2":  # the layouts compared: only for that student
            paths["baseline_hires"] = {0: bench.student("baseline_hires", 0, alpha=0.0, student="mobilenet_v2_hires")}
    for seed in range(args.seeds, args.kd_seeds):  # the comparisons the defaults rest on, with more seeds
        for name in ("baseline", "kd_offline", "dist_offline"):
            paths[name][seed] = bench.student(name, seed, **variants[name])
    for name, by_seed in paths.items():
        models[name] = {**describe(by_seed[0]), "top1": [bench.accuracy(p) for p in by_seed.values()]}
    int8 = {
        "kd_offline_qat": bench.int8(paths["kd_offline"][0], "qat"),
        "kd_offline_ptq": bench.int8(paths["kd_offline"][0], "ptq"),
        "baseline_ptq": bench.int8(paths["baseline"][0], "ptq"),
    }
    if "baseline_hires" in paths:
        int8["baseline_hires_ptq"] = bench.int8(paths["baseline_hires"][0], "ptq")
    onnx = bench.ort(int8, args.rounds)
    for name, path in int8.items():
        source = name.rsplit("_", 1)[0]
        models[name] = {"arch": models[source]["arch"], "parameters": models[source]["parameters"],
                        "float_model": source, "top1": [bench.accuracy(path)], **onnx[name]}  # fmt: skip
    return {"preset": preset.to_dict(), "seeds": args.seeds, "kd_seeds": max(args.seeds, args.kd_seeds),
            "test_images": len(bench.test),
            "train_images": bench.train_images,
            "models": models, "stage_seconds": bench.seconds}  # fmt: skip


def seed_interval(values: list[float]) -> tuple[float, float, float]:
    """Mean over seeds and its 95% t-interval (scipy); a degenerate interval when every seed gave the same."""
    mean = statistics.mean(values)
    if len(set(values)) == 1:
        return mean, mean, mean
    ci = scipy.stats.ttest_1samp(values, 0.0).confidence_interval(0.95)
    return mean, float(ci.low), float(ci.high)


def accuracy_cell(top1: list[float], test_images: int | None) -> str:
    """One seed: the proportion's Wilson 95% interval on the test images; several: the t-interval over seeds."""
    if len(top1) == 1:
        if not test_images:
            return f"{100 * top1[0]:.2f} (1 seed)"
        lo, hi = wilson(round(top1[0] * test_images), test_images, 0.95)
        return f"{100 * top1[0]:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] (1 seed)"
    mean, lo, hi = seed_interval(top1)
    return f"{100 * mean:.2f} [{100 * lo:.2f}, {100 * hi:.2f}] (n={len(top1)} seeds)"


def paired_diffs(a: list[float], b: list[float]) -> list[float]:
    """a - b in points, seed by seed, over the seeds both were trained on (seed i is index i in both)."""
    return [100 * (x - y) for x, y in zip(a, b, strict=False)]  # --kd-seeds: baseline and both offline KDs have more


def gain_cell(gains: list[float]) -> str:
    """A paired per-seed difference: its mean and 95% t-interval; "tie" unless the interval excludes zero."""
    mean, lo, hi = seed_interval(gains)
    if len(gains) == 1:
        return f"{mean:+.2f} pt (1 seed: no interval)"
    verdict = "tie" if lo <= 0 <= hi else "better" if lo > 0 else "worse"
    return f"{mean:+.2f} [{lo:+.2f}, {hi:+.2f}] pt (n={len(gains)}): {verdict}"


def summary_rows(result: dict) -> list[list[str]]:
    """The seed's table: one row per model, accuracy with its 95% interval (README and the console)."""
    m = result["models"]
    base = m["baseline"]["top1"]
    rows = []
    labels = {
        "teacher": "teacher",
        "baseline": "student, no KD (baseline)",
        "kd_offline": "student, Hinton KD offline",
        "kd_online": "student, Hinton KD online",
        "dist_offline": "student, DIST KD offline (alpha-blend)",
        "dist_paper": "student, DIST KD offline (paper: CE + inter + intra)",
        "kd_offline_qat": "student int8, QAT-KD (x86)",
        "kd_offline_ptq": "student int8, PTQ of KD student (x86)",
    }
    for name, label in labels.items():
        r = m[name]
        gain = drop = "—"
        if name in ("kd_offline", "kd_online", "dist_offline", "dist_paper"):
            gain = gain_cell(paired_diffs(r["top1"], base))
        if "float_model" in r:
            drop = f"{100 * (m[r['float_model']]['top1'][0] - r['top1'][0]):.2f} pt"
        size = r.get("int8_bytes", r.get("fp32_bytes"))
        lat = f"{r['ort_int8_ms']['b1']:.2f} / {r['ort_int8_ms']['b64']:.1f}" if "ort_int8_ms" in r else "—"
        rows.append([label, r["arch"], accuracy_cell(r["top1"], result.get("test_images")),
                     f"{r['parameters'] / 1e6:.2f} M", f"{size / 1e6:.2f}", lat, gain, drop])  # fmt: skip
    return rows


SUMMARY_HEADER = ["model", "arch", "test acc % [95% CI]", "params", "size MB", "ORT int8 ms b1 / b64",
                  "KD gain vs baseline, paired by seed [95% CI]", "int8 drop"]  # fmt: skip


def layout_rows(result: dict) -> list[list[str]]:
    m = result["models"]
    rows = []
    for float_name in ("baseline", "baseline_hires"):
        f, q = m[float_name], m[f"{float_name}_ptq"]
        rows.append([f["arch"], f"{100 * f['top1'][0]:.2f}", f"{100 * q['top1'][0]:.2f}",
                     f"{100 * q['ort_int8_top1']:.2f}", f"{q['ort_int8_ms']['b1']:.2f}",
                     f"{q['ort_int8_ms']['b64']:.1f}"])  # fmt: skip
    return rows


PAIRED = [
    ("kd_offline", "baseline", "Hinton KD offline - no KD"),
    ("kd_online", "kd_offline", "KD online - offline"),
    ("dist_offline", "kd_offline", "DIST - Hinton KD (offline)"),
    ("dist_offline", "baseline", "DIST - no KD"),
    ("dist_paper", "dist_offline", "DIST, paper's weighting - alpha-blend"),
    ("dist_paper", "kd_offline", "DIST, paper's weighting - Hinton KD"),
]


def paired_rows(result: dict) -> list[list[str]]:
    """The choices a default rests on, as differences paired by seed (same split, same initialisation)."""
    m = result["models"]
    rows = []
    for a, b, label in PAIRED:
        diffs = paired_diffs(m[a]["top1"], m[b]["top1"])
        rows.append([label, " ".join(f"{d:+.2f}" for d in diffs), gain_cell(diffs)])
    return rows


PAIRED_HEADER = ["difference (test top-1)", "per seed, pt", "mean [95% t-interval], verdict"]

LAYOUT_HEADER = ["student layout", "float acc %", "PTQ int8 acc % (PyTorch)", "PTQ int8 acc % (ORT)",
                 "ORT int8 ms b1", "ORT int8 ms b64"]  # fmt: skip


def findings(result: dict) -> list[str]:
    """What the tables support, one sentence each, worded from the verdicts (README prints them as generated)."""
    m = result["models"]

    def paired(a: str, b: str) -> str:
        return gain_cell(paired_diffs(m[a]["top1"], m[b]["top1"]))

    drops = {k: 100 * (m[m[k]["float_model"]]["top1"][0] - m[k]["top1"][0])
             for k in ("kd_offline_qat", "kd_offline_ptq")}  # fmt: skip
    env = result.get("environment", {})
    minutes = env.get("seconds", sum(result["stage_seconds"].values())) / 60
    cores = env.get("cpu", {}).get("logical_cpus", "?")
    lines = [
        f"- Hinton KD (offline) against no KD, paired by seed: {paired('kd_offline', 'baseline')}.",
        f"- Online against offline soft targets: {paired('kd_online', 'kd_offline')}.",
        f"- DIST (alpha-blend) against Hinton KD: {paired('dist_offline', 'kd_offline')}; DIST as its paper weighs "
        f"it against the alpha-blend: {paired('dist_paper', 'dist_offline')}.",
        f"- int8 for x86 (seed 0's KD student, float minus int8, PyTorch): QAT-KD {drops['kd_offline_qat']:.2f} pt, "
        f"PTQ {drops['kd_offline_ptq']:.2f} pt.",
    ]
    if "baseline_hires_ptq" in m:
        fast, hires = m["baseline_ptq"], m["baseline_hires_ptq"]
        lines.append(
            f"- Layout (seed 0's baseline): `{hires['arch']}` {100 * m['baseline_hires']['top1'][0]:.2f}% against "
            f"`{fast['arch']}` {100 * m['baseline']['top1'][0]:.2f}% in float, at "
            f"{hires['ort_int8_ms']['b1'] / fast['ort_int8_ms']['b1']:.1f}x its ONNX Runtime int8 latency at batch 1 "
            f"and {hires['ort_int8_ms']['b64'] / fast['ort_int8_ms']['b64']:.1f}x at batch 64."
        )
    lines.append(f"- Wall time: {minutes:.0f} min for the whole benchmark on {cores} cores (each stage's seconds in "
                 "the JSON).")  # fmt: skip
    return lines


def tables(result: dict) -> list[Table]:
    n, dataset = result["test_images"], result["preset"]["dataset"]
    data = f"{dataset}, {result['train_images']:,} training images"
    return [
        Table(f"{data}, top-1 on the {n:,} test images", SUMMARY_HEADER, summary_rows(result),
              "ORT: ONNX Runtime, 1 thread, median of rounds of medians; seed 0's model where n=1."),
        Table("Paired by seed: a tie unless the interval excludes zero", PAIRED_HEADER, paired_rows(result)),
        *([Table("Student layouts under one budget (the baseline recipe, seed 0; int8 = PTQ for x86)",
                 LAYOUT_HEADER, layout_rows(result))] if "baseline_hires_ptq" in result["models"] else []),
    ]  # fmt: skip


def readme_parts(result: dict) -> list[str | Table]:
    """README's block: the tables, then what they support."""
    return [*tables(result), "What the numbers support (generated from the tables):", "\n".join(findings(result))]


def show(result: dict) -> None:
    for table in tables(result):
        print_table(table)
    print("\n" + "\n".join(findings(result)))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="dataset root (Debian's files otherwise)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench-accuracy"), help="run folder (resumable)")
    parser.add_argument("--preset", default="fashion-mnist-cpu", choices=PRESET_NAMES,
                        help="recipe of every model: fashion-mnist-cpu (CPU) or fashion-mnist (GPU)")  # fmt: skip
    parser.add_argument("--subset", type=int, default=0, help="train on a class-balanced subset of N images")
    parser.add_argument("--teacher-epochs", type=int, default=0, help="teacher epochs  [default: the recipe's]")
    parser.add_argument("--epochs", type=int, default=0, help="student epochs  [default: the recipe's]")
    parser.add_argument("--seeds", type=int, default=5, help="student seeds (KD gains are paired by seed)")
    parser.add_argument("--kd-seeds", type=int, default=0,
                        help="seeds of the baseline, Hinton KD and DIST offline, if more than --seeds")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3, help="latency rounds, each timing every model in turn")
    parser.add_argument("--name", default=RESULTS_NAME, help="results file name: bench/results/NAME-<time>.json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    env = environment()
    t0 = time.perf_counter()
    result = run(args)
    env["seconds"] = time.perf_counter() - t0
    result = {"environment": finish(env), **result}
    show(result)  # its summary names the wall time and the cores from the environment record
    print(f"-> {write_results(args.name, result)}")


if __name__ == "__main__":
    main()
