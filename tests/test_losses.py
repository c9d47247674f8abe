import math

import pytest
import torch
import torch.nn.functional as F

from kdq.losses import KDLoss


def test_alpha_zero_is_cross_entropy():
    s, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    total, soft, hard = KDLoss(alpha=0.0)(s, y, torch.randn(8, 10))
    assert torch.allclose(total, F.cross_entropy(s, y))
    assert soft.item() == 0.0 and torch.equal(hard, total)


def test_matches_hand_computation_with_t_squared():
    s = torch.tensor([[1.0, 2.0, 0.5]])
    t = torch.tensor([[0.2, 3.0, -1.0]])
    y = torch.tensor([1])
    T, alpha = 4.0, 0.7
    ps = [math.exp(v / T) for v in s[0].tolist()]
    pt = [math.exp(v / T) for v in t[0].tolist()]
    ps = [p / sum(ps) for p in ps]
    pt = [p / sum(pt) for p in pt]
    kl = sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    ce = -math.log(math.exp(2.0) / sum(math.exp(v) for v in s[0].tolist()))
    total, soft, hard = KDLoss(alpha, T)(s, y, t)
    assert soft.item() == pytest.approx(T * T * kl, rel=1e-5)
    assert hard.item() == pytest.approx(ce, rel=1e-5)
    assert total.item() == pytest.approx(alpha * T * T * kl + (1 - alpha) * ce, rel=1e-5)


def test_soft_term_scales_with_t_squared_for_tiny_logits():
    # For small logits KL(T) ~ 1/T^2, so T^2 * KL is nearly independent of T (Hinton et al.).
    s, t = 1e-2 * torch.randn(4, 10), 1e-2 * torch.randn(4, 10)
    y = torch.zeros(4, dtype=torch.long)
    soft2 = KDLoss(1.0, 2.0)(s, y, t)[1]
    soft8 = KDLoss(1.0, 8.0)(s, y, t)[1]
    assert soft2.item() == pytest.approx(soft8.item(), rel=0.05)  # with the T^2 factor: T-independent
    assert (soft2 / 4).item() == pytest.approx((soft8 / 64).item() * 16, rel=0.05)  # raw KL: 16x apart


def test_identical_logits_have_zero_soft_loss():
    s = torch.randn(5, 10)
    assert KDLoss(1.0, 4.0)(s, torch.zeros(5, dtype=torch.long), s.clone())[1].abs().item() < 1e-6


@pytest.mark.parametrize("alpha,temperature", [(-0.1, 4.0), (1.5, 4.0), (0.5, 0.0), (0.5, -1.0)])
def test_rejects_bad_weights(alpha, temperature):
    with pytest.raises(ValueError):
        KDLoss(alpha, temperature)


def test_soft_labels_from_mixing_are_accepted():
    s = torch.randn(4, 10)
    probs = torch.softmax(torch.randn(4, 10), 1)
    total, _, _ = KDLoss(0.0)(s, probs)
    assert torch.allclose(total, -(probs * F.log_softmax(s, 1)).sum(1).mean())


def test_soft_term_is_the_per_sample_mean_over_a_batch():
    """N > 1: T^2 * (sum over samples of KL) / N. `reduction="mean"` (divides by N*C too) or "sum" fails this."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    T = 2.0
    per_sample = []
    for row_s, row_t in zip(s.tolist(), t.tolist(), strict=True):
        ps = [math.exp(v / T) for v in row_s]
        pt = [math.exp(v / T) for v in row_t]
        ps, pt = [p / sum(ps) for p in ps], [p / sum(pt) for p in pt]
        per_sample.append(sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True)))
    soft = KDLoss(1.0, T)(s, torch.zeros(3, dtype=torch.long), t)[1]
    assert soft.item() == pytest.approx(T * T * sum(per_sample) / 3, rel=1e-5)


def _softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


def _pearson(a: list[float], b: list[float]) -> float:
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    cov = sum((x - ma) * (y - mb) for x, y in zip(a, b, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))


def test_dist_matches_hand_computation():
    """DIST = T^2 * [(1 - mean over images of Pearson across classes) + (1 - mean over classes of Pearson
    across images)] of the softened probabilities, blended with CE by alpha like Hinton's term."""
    s = [[1.0, 2.0, 0.5], [0.3, -1.0, 2.2]]
    t = [[0.2, 3.0, -1.0], [1.5, 0.1, 0.4]]
    T, alpha = 2.0, 0.6
    ps, pt = [_softmax(r, T) for r in s], [_softmax(r, T) for r in t]
    inter = 1 - sum(_pearson(a, b) for a, b in zip(ps, pt, strict=True)) / 2
    columns = lambda p: [[row[c] for row in p] for c in range(3)]  # noqa: E731
    intra = 1 - sum(_pearson(a, b) for a, b in zip(columns(ps), columns(pt), strict=True)) / 3
    y = torch.tensor([1, 2])
    total, soft, hard = KDLoss(alpha, T, kind="dist")(torch.tensor(s), y, torch.tensor(t))
    assert soft.item() == pytest.approx(T * T * (inter + intra), rel=1e-5)
    assert total.item() == pytest.approx(alpha * soft.item() + (1 - alpha) * F.cross_entropy(torch.tensor(s), y).item())


@pytest.mark.parametrize("kind", ["hinton", "dist"])
def test_sum_weighting_keeps_cross_entropy_at_full_weight(kind):
    """The DIST paper's form: CE + beta * inter + gamma * intra, with beta = gamma = alpha, for either term."""
    s, t, y = torch.randn(6, 10), torch.randn(6, 10), torch.randint(0, 10, (6,))
    total, soft, hard = KDLoss(0.4, 4.0, kind=kind, weighting="sum")(s, y, t)
    assert hard.item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)
    assert total.item() == pytest.approx(hard.item() + 0.4 * soft.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown KD weighting 'mean'"):
        KDLoss(0.4, 4.0, weighting="mean")


def test_dist_is_zero_for_the_teacher_itself_and_positive_for_another():
    s, t = torch.randn(16, 10), torch.randn(16, 10)
    loss = KDLoss(1.0, 1.0, kind="dist")
    assert loss(s, torch.zeros(16, dtype=torch.long), s)[1].item() == pytest.approx(0.0, abs=1e-5)
    assert loss(s, torch.zeros(16, dtype=torch.long), t)[1].item() > 0.5
    with pytest.raises(ValueError, match="unknown KD loss 'dkd'"):
        KDLoss(kind="dkd")


def _dist_rank(rank: int, port: int, x, t, out: str) -> None:
    """One rank of 2 gloo processes: DIST on its half of the batch, gradient averaged over ranks as DDP does."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    w = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3))
    KDLoss(1.0, 2.0, kind="dist")(x[rank::2] @ w, torch.zeros(4, dtype=torch.long), t[rank::2])[0].backward()
    dist.all_reduce(w.grad)
    if rank == 0:
        torch.save(w.grad / 2, out)
    dist.destroy_process_group()


def test_dist_under_two_processes_is_the_one_process_loss(tmp_path):
    """The intra-class term correlates each class over the whole batch: with the batch split over 2 ranks, the
    gathered probabilities make the DDP-averaged gradient equal the one-process one."""
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    gen = torch.Generator().manual_seed(0)
    x, t = torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_dist_rank, args=(r, port, x, t, str(tmp_path / "g.pt"))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    w = torch.nn.Parameter(torch.linspace(-1, 1, 12).reshape(4, 3))
    KDLoss(1.0, 2.0, kind="dist")(x @ w, torch.zeros(8, dtype=torch.long), t)[0].backward()
    assert torch.allclose(torch.load(tmp_path / "g.pt"), w.grad, atol=1e-6)
