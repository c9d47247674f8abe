"""Benchmark 1: training throughput of kdq's device-resident pipeline vs a DataLoader + PIL pipeline (the seed's).

    uv run --frozen python -m bench.training

Both sides train the same model at the same batch size with the same augmentation (random translation by up
to 4 px with reflect padding, horizontal flip) and the same SGD step, on generated CIFAR-sized data:
- kdq: `kdq.train.fit` itself (uint8 data on the device, batched augmentation, channels_last; bf16 autocast on
  GPUs). Its own `images_per_second` (history.json) of the epochs after the first is the result.
- conventional: a torchvision `DataLoader` over a dataset that does what `torchvision.datasets.CIFAR10` does
  per image (numpy -> PIL -> RandomCrop, RandomHorizontalFlip, ToTensor, Normalize), `num_workers` worker
  processes (persistent, so worker start-up is not counted: the conventional side's best case), NCHW fp32
  as the seed ran it, and again with channels_last so the layout's share of the difference shows.
Steady state: each pipeline runs a warm-up epoch (and torch.compile's compile time) and a timed one, in rounds
that interleave the pipelines; the best round counts and every round is recorded (a shared machine only
ever slows a round down).
The pipelines alone (batches produced per second, no model) are measured as well, which is what decides the
outcome once the model step is fast (GPUs). On a GPU the comparison adds bf16, channels_last and
torch.compile, and projects the wall time of the `cifar10` preset from the measured rates.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import Table, print_table, run_alone
from kdq.checkpoint import HISTORY
from kdq.config import Augment, Optim
from kdq.data import Dataset, Normalize, Split, augment, shuffled_batches
from kdq.models import build_model
from kdq.presets import get_preset
from kdq.train import Runtime, fit

CIFAR10_TRAIN_IMAGES = 50_000
SEED = "DataLoader + PIL (fp32, NCHW)"  # the seed project's pipeline: the reference of every ratio


def generated_data(n_train: int, n_test: int = 128, classes: int = 10, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    split = lambda n: Split(  # noqa: E731
        torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, classes, (n,), generator=g),
    )
    return Dataset("generated", split(n_train), split(n_test), [str(c) for c in range(classes)])


class PILImages(torch.utils.data.Dataset):
    """What torchvision.datasets.CIFAR10.__getitem__ does: an HWC uint8 array -> PIL image -> transform."""

    def __init__(self, split: Split, transform):
        self.images = split.images.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = split.labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def conventional_loader(data: Dataset, aug: Augment, batch: int, workers: int, pin: bool):
    from torchvision import transforms as T

    mean, std = data.normalization()
    steps = [T.RandomCrop(32, padding=aug.crop_padding, padding_mode="reflect")] if aug.crop_padding else []
    steps += [T.RandomHorizontalFlip()] if aug.flip else []
    transform = T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
    return torch.utils.data.DataLoader(
        PILImages(data.train, transform),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin,
    )


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def kdq_rate(arch: str, data: Dataset, batch: int, aug: Augment, dev: torch.device, epochs: int, compile: bool):
    """kdq's training loop as users run it: `fit`, whose history records images/s per epoch."""
    torch.manual_seed(0)
    model = build_model(arch, len(data.classes))
    with tempfile.TemporaryDirectory(prefix="kdq-bench-") as tmp:
        ckpt = fit(
            model,
            {"name": arch, "num_classes": len(data.classes), "kwargs": {}},
            data,
            Optim(epochs=epochs, lr=0.05, batch_size=batch),
            aug,
            Path(tmp),
            stage=f"bench-{arch}",
            preset={},
            rt=Runtime(dev),
            compile=compile,
        )
    rates = [h["images_per_second"] for h in ckpt[HISTORY]]
    return {"img_s": max(rates[1:]), "epochs_img_s": rates}


def conventional_rate(
    arch: str,
    data: Dataset,
    batch: int,
    aug: Augment,
    dev: torch.device,
    epochs: int,
    workers: int,
    bf16: bool = False,
    channels_last: bool = False,
    compile: bool = False,
):
    """The seed's loop: DataLoader batches copied to the device, then the same SGD step as `fit`."""
    torch.manual_seed(0)
    loader = conventional_loader(data, aug, batch, workers, pin=dev.type == "cuda")
    model = build_model(arch, len(data.classes)).to(dev).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step_model = torch.compile(model) if compile else model
    rates = []
    for _ in range(epochs):
        _sync(dev)
        t0, seen = time.perf_counter(), 0
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(step_model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss.item()  # the running loss is logged every step, as in fit
            seen += len(y)
        _sync(dev)
        rates.append(seen / (time.perf_counter() - t0))
    return {"img_s": max(rates[1:]), "epochs_img_s": rates}


def pipeline_only_rates(data: Dataset, aug: Augment, batch: int, dev: torch.device, workers: list[int]) -> dict:
    """Images/s of producing normalized, augmented batches on the device, without any model (best of 2 epochs)."""
    normalize = Normalize(*data.normalization(), device=dev)
    train_x = data.train.images.to(dev)
    gen = torch.Generator(dev).manual_seed(0)
    rates = {}
    best = 0.0
    for _ in range(3):
        _sync(dev)
        t0 = time.perf_counter()
        for idx in shuffled_batches(len(train_x), batch, gen):
            normalize(augment(train_x[idx], aug, gen))
        _sync(dev)
        best = max(best, (len(train_x) // batch) * batch / (time.perf_counter() - t0))
    rates["kdq (augment + normalize on the device)"] = best
    for w in workers:
        loader = conventional_loader(data, aug, batch, w, pin=dev.type == "cuda")
        best = 0.0
        for _ in range(3):  # the first epoch starts the persistent workers
            t0, seen = time.perf_counter(), 0
            for x, _y in loader:
                x.to(dev, non_blocking=True)
                seen += len(x)
            _sync(dev)
            best = max(best, seen / (time.perf_counter() - t0))
        rates[f"DataLoader + PIL, {w} worker{'s' * (w != 1)}"] = best
    return rates


def measure(args: argparse.Namespace) -> dict:
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    preset = get_preset("cifar10")
    aug, batch = preset.augment, preset.student_optim.batch_size
    teacher = args.teacher or (preset.teacher if cuda else "resnet18")
    models = {"student": preset.student, "teacher": teacher}
    steps = {"student": args.student_steps, "teacher": args.teacher_steps}
    result: dict = {
        "device": str(dev),
        "batch_size": batch,
        "augment": dataclasses.asdict(aug),
        "workers": args.workers,
        "epochs": args.epochs,
        "rounds": args.train_rounds,
        "models": models,
        "rows": [],
    }
    if cuda:
        variants = [
            ("kdq", "fit (bf16, channels_last)", {}),
            ("kdq", "fit + torch.compile (bf16, channels_last)", {"compile": True}),
            ("conventional", SEED, {}),
            ("conventional", "DataLoader + PIL + bf16 + channels_last", {"bf16": True, "channels_last": True}),
            (
                "conventional",
                "DataLoader + PIL + bf16 + channels_last + torch.compile",
                {"bf16": True, "channels_last": True, "compile": True},
            ),
        ]
    else:  # the channels_last row separates the memory layout's share from the input pipeline's
        variants = [
            ("kdq", "fit (fp32, channels_last)", {}),
            ("conventional", SEED, {}),
            ("conventional", "DataLoader + PIL + channels_last (fp32)", {"channels_last": True}),
        ]
    data = {role: generated_data(steps[role] * batch) for role in args.models}
    pipeline_data = generated_data(args.pipeline_images)
    runs: dict[tuple[str, str], list[dict]] = {}
    pipeline_only: dict[str, list[float]] = {}
    for r in range(args.train_rounds):  # rounds interleave the pipelines: a burst of load hits one round, not one side
        for role in args.models:
            arch = models[role]
            print(
                f"[training] round {r + 1}/{args.train_rounds} {role} {arch}: {steps[role]} steps x {args.epochs} "
                "epochs per pipeline",
                file=sys.stderr,
            )
            for pipeline, label, kw in variants:
                if pipeline == "kdq":
                    rate = kdq_rate(arch, data[role], batch, aug, dev, args.epochs, kw.get("compile", False))
                else:
                    rate = conventional_rate(arch, data[role], batch, aug, dev, args.epochs, args.workers, **kw)
                runs.setdefault((role, label), []).append(rate)
        rates = pipeline_only_rates(pipeline_data, aug, batch, dev, sorted({0, args.workers}))
        for label, v in rates.items():
            pipeline_only.setdefault(label, []).append(v)
    for (role, label), per_round in runs.items():
        pipeline = next(p for p, lab, _ in variants if lab == label)
        result["rows"].append(
            {
                "role": role,
                "arch": models[role],
                "pipeline": pipeline,
                "variant": label,
                "img_s": max(x["img_s"] for x in per_round),
                "rounds_img_s": [x["img_s"] for x in per_round],
                "epochs_img_s": [x["epochs_img_s"] for x in per_round],
            }
        )
    result["pipeline_only_img_s"] = {label: max(v) for label, v in pipeline_only.items()}
    result["pipeline_only_rounds_img_s"] = pipeline_only
    if cuda and set(args.models) == {"student", "teacher"}:
        result["projection"] = project_cifar10(result["rows"], preset)
    return result


def project_cifar10(rows: list[dict], preset) -> list[dict]:
    """Wall time of the cifar10 preset's training epochs at the measured rates (evaluation passes excluded)."""
    out = []
    for variant in dict.fromkeys(r["variant"] for r in rows if r["pipeline"] == "kdq"):
        rate = {r["role"]: r["img_s"] for r in rows if r["variant"] == variant}
        teacher_s = preset.teacher_optim.epochs * CIFAR10_TRAIN_IMAGES / rate["teacher"]
        student_s = preset.student_optim.epochs * CIFAR10_TRAIN_IMAGES / rate["student"]
        # baseline: same recipe as the student; QAT: fake-quant makes it slower than this estimate
        rest_s = (preset.student_optim.epochs + preset.quant.qat_optim.epochs) * CIFAR10_TRAIN_IMAGES / rate["student"]
        out.append(
            {
                "variant": variant,
                "teacher_s": teacher_s,
                "student_s": student_s,
                "teacher_plus_student_s": teacher_s + student_s,
                "all_stages_s": teacher_s + student_s + rest_s,
            }
        )
    return out


def tables(result: dict) -> list[Table]:
    rows = result["rows"]
    ref = {r["role"]: r["img_s"] for r in rows if r["variant"] == SEED}
    throughput = Table(
        f"Training throughput on {result['device']} (images/s; best of {result['rounds']} rounds of a warm-up and "
        f"a timed epoch; batch {result['batch_size']}, {result['workers']} loader workers)",
        ["model", "pipeline", "img/s", "vs DataLoader+PIL", "per round"],
        [
            [
                f"{r['role']} ({r['arch']})",
                r["variant"],
                f"{r['img_s']:.1f}",
                f"{r['img_s'] / ref[r['role']]:.2f}x",
                " ".join(f"{v:.1f}" for v in r["rounds_img_s"]),
            ]
            for r in rows
        ],
    )
    pipelines = Table(
        "Input pipeline alone (images/s delivered to the device, no model)",
        ["pipeline", "img/s"],
        [[k, f"{v:.0f}"] for k, v in result["pipeline_only_img_s"].items()],
    )
    return [throughput, pipelines]


def show(result: dict) -> None:
    for table in tables(result):
        print_table(table)
    for p in result.get("projection", []):
        print(
            f"cifar10 preset projected ({p['variant']}): teacher 50 epochs {p['teacher_s'] / 3600:.2f} h + "
            f"student 20 epochs {p['student_s'] / 3600:.2f} h = {p['teacher_plus_student_s'] / 3600:.2f} h; "
            f"with baseline and QAT {p['all_stages_s'] / 3600:.2f} h"
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    cuda = torch.cuda.is_available()
    parser.add_argument("--device", default="cuda" if cuda else "cpu")
    parser.add_argument("--models", nargs="+", choices=["student", "teacher"], default=["student", "teacher"])
    parser.add_argument("--teacher", default=None, help="teacher arch [default: resnet18 on CPU, resnet152 on GPU]")
    parser.add_argument("--epochs", type=int, default=3 if cuda else 2, help="per pipeline; the first is warm-up")
    parser.add_argument("--train-rounds", type=int, default=2, help="interleaved repetitions; the best one counts")
    parser.add_argument("--student-steps", type=int, default=60 if cuda else 6, help="steps per epoch")
    parser.add_argument("--teacher-steps", type=int, default=40 if cuda else 2, help="steps per epoch")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="DataLoader workers")
    parser.add_argument("--pipeline-images", type=int, default=4096, help="images per epoch, pipelines alone")


def run(args: argparse.Namespace) -> dict:
    return measure(args)


def main(argv: list[str] | None = None) -> None:
    run_alone("training", __doc__, add_arguments, run, show, argv)


if __name__ == "__main__":
    main()
