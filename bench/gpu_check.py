"""`make gpu-check`: everything only a GPU runs, each briefly, in one script (about 2.5 min on an H200).

    make gpu-check                                        # the checks below -> bench/results/gpu-check-*.json
    uv run --frozen python -m bench.gpu_check --full      # then the fashion-mnist preset, its epochs cut to 10 min
    PYTHONPATH=. python3 -m bench.gpu_check --data-dir data   # a lent GPU machine: its own Python, no venv

A GPU is lent rarely and briefly, so this is written and run on the CPU first (`--device cpu --tiny`,
tests/test_gpu_check.py): on a GPU the same code takes the CUDA paths. Each check runs on its own, records
`ok`, `failed` (the error's last line) or `skipped` (why: no CUDA, a module the machine lacks), its seconds and
its numbers, and never stops the others:
- `bf16_channels_last`: `kdq teacher` on Fashion-MNIST images: kdq.train's bf16 autocast and channels_last on
  CUDA (float32 on a CPU), images/s and validation accuracy from its history.json;
- `sync_batchnorm`: kdq.train.sync_batchnorm in a one-rank process group (NCCL on CUDA, gloo on a CPU):
  every BatchNorm converted, train-mode outputs and gradients equal to plain BatchNorm's at world size 1;
- `streaming`: kdq.device_data's pinned-memory streaming gives the batches the on-device path gives, and
  its images/s;
- `pt2e_qat`: `kdq distill --qat --flow pt2e` from that teacher (torchao's PT2E QAT on the device);
- `preset_epoch`: one epoch of the fashion-mnist preset's teacher on all 60,000 images; the preset's
  projected wall time (teacher and student epochs at that speed).
The data: Fashion-MNIST in `--data-dir` (torchvision's FashionMNIST/raw layout) or Debian's package.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from bench.common import Table, environment, markdown_table, write_results
from kdq.files import save_json
from kdq.presets import Preset
from kdq.stats import rate_interval

RESULTS_NAME = "gpu-check"
FULL_BUDGET_S = 600  # --full: the fashion-mnist preset's pipeline, sized to finish in 10 minutes
FULL_TRAINING_SHARE = 0.6  # of that budget, for the training epochs
FASHION_MNIST_TEST_IMAGES = 10_000  # the preset's test split (t10k), for results written before test_images was


class Skip(Exception):
    """A check that cannot run here (no CUDA for a CUDA-only path, a module this machine lacks)."""


def time_left(ctx: dict) -> float:
    """Seconds a check may still take: its own cap, cut to what is left of the whole run's --deadline-s."""
    left = ctx["deadline"] - time.monotonic()
    if left < 10:
        raise Skip(f"--deadline-s reached ({left:.0f} s left)")
    return min(ctx["timeout"], left)


def kdq(*args, timeout: float) -> None:
    """The kdq CLI in a subprocess: a CUDA error or a hang in one check cannot take the others down."""
    cmd = [sys.executable, "-m", "kdq.cli", *map(str, args)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:  # its last progress line says how far it got, and how fast
        text = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
        last = text.replace("\r", "\n").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"`kdq {args[0]}` did not finish in {timeout:.0f} s; last: {last[0].strip()}") from e
    if proc.returncode != 0:
        lines = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()
        raise RuntimeError(f"`kdq {' '.join(map(str, args[:1]))}` exited {proc.returncode}: {lines[-1]}")


def history(stage_dir: Path) -> dict:
    """The last epoch of a stage's history.json: accuracy and images/s as kdq.train measured them."""
    last = json.loads((stage_dir / "history.json").read_text())[-1]
    return {k: last[k] for k in ("epoch", "val_acc", "train_acc", "images_per_second", "epoch_seconds") if k in last}


def check_bf16_channels_last(ctx: dict) -> dict:
    run = ctx["run"]
    kdq("teacher", "--preset", "smoke", "--dataset", "fashion-mnist", "--data-dir", ctx["data_dir"],
        "--train-subset", ctx["images"], "--epochs", ctx["epochs"], "--device", ctx["device"], "--run-dir", run,
        "--no-tensorboard", timeout=time_left(ctx))  # fmt: skip
    return {"amp": "bf16 autocast, channels_last" if ctx["cuda"] else "float32 (CPU)", **history(run / "teacher")}


def check_sync_batchnorm(ctx: dict) -> dict:
    import torch.distributed as dist
    from torch import nn

    from kdq.models import build_model
    from kdq.train import sync_batchnorm

    dev = torch.device(ctx["device"])
    dist.init_process_group("nccl" if ctx["cuda"] else "gloo", init_method="tcp://127.0.0.1:29517", rank=0,
                            world_size=1)  # fmt: skip
    try:
        torch.manual_seed(0)
        plain = build_model("resnet20", 10).to(dev, memory_format=torch.channels_last).train()
        synced = sync_batchnorm(copy.deepcopy(plain), dev)
        kinds = {type(m).__name__ for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        x = torch.randn(64, 3, 32, 32, device=dev).contiguous(memory_format=torch.channels_last)
        outs, grads = [], []
        for model in (plain, synced):
            model.zero_grad()
            y = model(x)
            y.square().mean().backward()
            outs.append(y.detach().float())
            grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        out_diff = (outs[0] - outs[1]).abs().max().item()
        grad_diff = (grads[0] - grads[1]).abs().max().item()
    finally:
        dist.destroy_process_group()
    if out_diff > 1e-4 or grad_diff > 1e-4:
        raise RuntimeError(f"world size 1: sync BN differs from BN (outputs {out_diff:.2e}, grads {grad_diff:.2e})")
    return {"batchnorm_classes": sorted(kinds), "max_output_diff": out_diff, "max_grad_diff": grad_diff}


def check_streaming(ctx: dict) -> dict:
    from kdq.data import load_dataset
    from kdq.device_data import TrainImages

    dev = torch.device(ctx["device"])
    images = load_dataset("fashion-mnist", ctx["data_dir"]).train.images[: ctx["stream_images"]]
    result = {}
    batches = {}
    for stream in (False, True):
        data = TrainImages(images, dev, stream=stream)
        gen = torch.Generator(device=dev).manual_seed(0)
        if ctx["cuda"]:
            torch.cuda.synchronize()
        start = time.perf_counter()
        batches[stream] = [(idx, x.float().sum()) for idx, x in data.epoch(256, gen)]
        if ctx["cuda"]:
            torch.cuda.synchronize()
        result["streamed_images_per_s" if stream else "on_device_images_per_s"] = len(images) / (
            time.perf_counter() - start)  # fmt: skip
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*batches.values(), strict=True))
    if not same:
        raise RuntimeError("streamed batches differ from the on-device ones")
    return {"images": len(images), "batches": len(batches[True]), "pinned": ctx["cuda"], **result}


def check_pt2e_qat(ctx: dict) -> dict:
    try:
        import torchao  # noqa: F401
    except ImportError as e:
        raise Skip(f"PT2E QAT needs torchao: {e}") from e
    run = ctx["run"]
    if not (run / "teacher" / "checkpoint.pt").is_file():
        raise Skip("no teacher: bf16_channels_last failed")
    kdq("distill", "--qat", "--flow", "pt2e", "--preset", "smoke", "--dataset", "fashion-mnist", "--data-dir",
        ctx["data_dir"], "--train-subset", ctx["images"], "--epochs", ctx["epochs"], "--device", ctx["device"],
        "--run-dir", run, "--no-tensorboard", timeout=time_left(ctx))  # fmt: skip
    stages = sorted(p.name for p in run.iterdir() if p.name.startswith("student_qat"))
    return {"stages": stages, **history(run / stages[-1])}


def check_preset_epoch(ctx: dict) -> dict:
    from kdq.presets import get_preset

    if ctx["tiny"]:
        raise Skip("--tiny: one epoch on 60,000 images is the GPU's job")
    preset = get_preset("fashion-mnist")
    run = ctx["run"] / "preset"
    kdq("teacher", "--preset", "fashion-mnist", "--data-dir", ctx["data_dir"], "--epochs", 1, "--val-fraction", 0,
        "--device", ctx["device"], "--run-dir", run, "--no-tensorboard", timeout=time_left(ctx))  # fmt: skip
    epoch = history(run / "teacher")
    epochs = sum(n for stage, n in stage_epochs(preset).items() if stage != "qat")
    return {**epoch, "preset_epochs": epochs, "projected_minutes": epoch["epoch_seconds"] * epochs / 60,
            "note": "teacher epochs at the ResNet teacher's speed: the MobileNetV2 students are faster"}  # fmt: skip


def stage_epochs(preset: Preset) -> dict[str, int]:
    """The epochs of each training stage `kdq pipeline` runs: teacher, baseline and KD student, QAT."""
    students = preset.student_optim.epochs
    return {"teacher": preset.teacher_optim.epochs, "baseline": students, "student": students,
            "qat": preset.quant.qat_optim.epochs}  # fmt: skip


def full_recipe(seconds_per_epoch: float, budget_s: float) -> Preset:
    """The fashion-mnist preset with every stage's epochs cut by one factor, so that its training takes
    FULL_TRAINING_SHARE of `budget_s` at the speed preset_epoch measured (the rest: soft targets, calibration,
    export, certificate)."""
    from kdq.presets import get_preset

    preset = get_preset("fashion-mnist")
    qat = preset.quant.qat_optim
    scale = min(1.0, FULL_TRAINING_SHARE * budget_s / (seconds_per_epoch * sum(stage_epochs(preset).values())))

    def cut(optim):
        return dataclasses.replace(optim, epochs=max(1, round(optim.epochs * scale)))

    return dataclasses.replace(preset, name="fashion-mnist-gpu-full", teacher_optim=cut(preset.teacher_optim),
                               student_optim=cut(preset.student_optim),
                               quant=dataclasses.replace(preset.quant, qat_optim=cut(qat)))  # fmt: skip


def check_full_pipeline(ctx: dict) -> dict:
    """`kdq pipeline` end to end on the device, from a recipe sized by preset_epoch's speed to the budget."""
    from kdq.presets import recipe_toml

    epoch = ctx.get("epoch_check") or {}
    if epoch.get("status") != "ok":
        raise Skip("--full is sized from preset_epoch's seconds per epoch, and preset_epoch did not run")
    recipe = full_recipe(epoch["epoch_seconds"], ctx["timeout"])
    path = ctx["run"].parent / "full.toml"
    path.write_text(recipe_toml(recipe))
    run = ctx["run"].parent / "full"
    record = {"budget_s": ctx["timeout"], "epochs": {"teacher": recipe.teacher_optim.epochs,
              "student": recipe.student_optim.epochs, "qat": recipe.quant.qat_optim.epochs}}  # fmt: skip
    try:
        kdq("pipeline", "--recipe", path, "--data-dir", ctx["data_dir"], "--device", ctx["device"], "--run-dir", run,
            "--no-tensorboard", timeout=time_left(ctx))  # fmt: skip
    except RuntimeError as e:
        e.partial = finished(run, record)  # what finished before it failed or ran out of time
        raise
    return finished(run, record)


def finished(run: Path, record: dict) -> dict:
    """The stages a pipeline run finished (last epoch of each), its test accuracies and certificate verdicts."""
    record["stages"] = {d.name: history(d) for d in sorted(run.glob("*/")) if (d / "history.json").is_file()}
    if (run / "evaluation_results.json").is_file():
        evaluated = json.loads((run / "evaluation_results.json").read_text())
        record["test_top1"] = {name: row["top1"] for name, row in evaluated.items()}
        record["test_images"] = len(next(iter(evaluated.values()))["correct"])
    for manifest in sorted(run.glob("export-*/manifest.json")):
        verdict = json.loads(manifest.read_text())["certificate"]["verdict"]
        record.setdefault("certificates", {})[manifest.parent.name] = verdict
        parity = manifest.parent / "parity.json"
        if parity.is_file():  # the gates that did not pass, and why: the run folder is gone after this script
            record.setdefault("gates_not_passed", {})[manifest.parent.name] = {
                c["name"]: c["reason"] or f"{c['value']} against {c['threshold']}"
                for c in json.loads(parity.read_text())["checks"] if not c["passed"]}  # fmt: skip
    return record


CHECKS: dict[str, Callable[[dict], dict]] = {
    "bf16_channels_last": check_bf16_channels_last,
    "sync_batchnorm": check_sync_batchnorm,
    "streaming": check_streaming,
    "pt2e_qat": check_pt2e_qat,
    "preset_epoch": check_preset_epoch,
}
EXTRA_CHECKS = {"full_pipeline": check_full_pipeline}  # --full


def run_check(name: str, ctx: dict) -> dict:
    start = time.perf_counter()
    try:
        time_left(ctx)
        record = {"status": "ok", **(CHECKS | EXTRA_CHECKS)[name](ctx)}
    except Skip as e:
        record = {"status": "skipped", "why": str(e)}
    except Exception as e:  # a failed check is a result: the others still run
        error = f"{e.__class__.__name__}: {e}".splitlines()[0]
        record = {**getattr(e, "partial", {}), "status": "failed", "error": error,
                  "traceback": traceback.format_exc(limit=3)}  # fmt: skip
    record["seconds"] = round(time.perf_counter() - start, 2)
    print(f"[gpu-check] {name:<20} {record['status']:<8} {record['seconds']:7.1f} s  "
          f"{record.get('why') or record.get('error') or ''}", file=sys.stderr, flush=True)  # fmt: skip
    return record


def machine() -> dict:
    """bench.common.environment, or what can be known where it cannot run (a GPU machine without onnxruntime)."""
    try:
        return environment()
    except ImportError as e:
        import platform

        return {"host": platform.node(), "python": platform.python_version(), "incomplete": str(e)}


def header(device: str) -> dict:
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else "cpu"
    return {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}


def _figures(name: str, c: dict) -> str:
    """The numbers each check is run for, in a few words."""
    if c["status"] != "ok":
        return c.get("why") or c.get("error", "")
    if name in ("bf16_channels_last", "pt2e_qat"):
        return f"{c['images_per_second']:,.0f} img/s, val {c['val_acc']:.1%} after {c['epoch']} epochs"
    if name == "sync_batchnorm":
        return f"{', '.join(c['batchnorm_classes'])}; max |Δ| outputs {c['max_output_diff']:.1e}, grads " \
               f"{c['max_grad_diff']:.1e}"  # fmt: skip
    if name == "streaming":
        return f"{c['images']:,} images: on device {c['on_device_images_per_s']:,.0f} img/s, streamed (pinned) " \
               f"{c['streamed_images_per_s']:,.0f} img/s, same batches"  # fmt: skip
    if name == "preset_epoch":
        return f"{c['epoch_seconds']:.1f} s per 60,000-image epoch; the preset's {c['preset_epochs']} epochs ≈ " \
               f"{c['projected_minutes']:.0f} min"  # fmt: skip
    return ""


def gates_not_passed(full: dict) -> dict[str, str]:
    """Gate -> why, from the record; results written before it was kept name the gates in the error alone."""
    if "gates_not_passed" in full:
        return {g: why for by_export in full["gates_not_passed"].values() for g, why in by_export.items()}
    named = re.search(r"gates failed: ([^(]+) \(", full.get("error", ""))
    return {g.strip(): "" for g in named[1].split(",")} if named else {}


def tables(result: dict) -> list[str | Table]:
    """What ran on the GPU, and (--full) the pipeline it ran end to end."""
    checks = result["checks"]
    rows = [[name, c["status"], f"{c['seconds']:.0f}", _figures(name, c)] for name, c in checks.items()
            if name != "full_pipeline"]  # fmt: skip
    parts: list[str | Table] = []
    if rows:
        parts.append(Table(f"make gpu-check on one {result['device']} (torch {result['torch']}, CUDA "
                           f"{result['cuda']})", ["check", "status", "s", "figures"], rows))  # fmt: skip
    full = checks.get("full_pipeline")
    if full and "stages" in full:
        n = full.get("test_images", FASHION_MNIST_TEST_IMAGES)
        top1 = full.get("test_top1", {})
        stage_rows = []
        for stage, h in full["stages"].items():
            acc = top1.get(stage)
            ci = "{:.1%} – {:.1%}".format(*rate_interval(round(acc * n), n)) if acc is not None else ""
            stage_rows.append([stage, h["epoch"], f"{h['images_per_second']:,.0f}", f"{h['epoch_seconds']:.1f}",
                               f"{acc:.2%}" if acc is not None else "", ci])  # fmt: skip
        epochs = full["epochs"]
        parts.append(Table(
            f"GPU_ARGS=--full: `kdq pipeline` on the fashion-mnist preset, epochs cut to fit {full['budget_s']:.0f} s "
            f"(teacher {epochs['teacher']}, students {epochs['student']}, QAT {epochs['qat']}); test top-1 on "
            f"the {n:,} test images (95% Wilson interval)",
            ["stage", "epochs", "img/s", "s per epoch", "test top-1", "95% CI"], stage_rows))  # fmt: skip
        verdicts = ", ".join(f"`{k}` {v}" for k, v in full.get("certificates", {}).items()) or "no export"
        gates = "; ".join(f"`{g}`" + (f" ({why})" if why else "") for g, why in gates_not_passed(full).items())
        parts.append(f"The pipeline ran {full['seconds']:.0f} s: {verdicts}"
                     + (f"; gates not passed: {gates}." if gates else "."))  # fmt: skip
    return parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])  # fmt: skip
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the script")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="holds FashionMNIST/raw (or Debian's)")
    parser.add_argument("--tiny", action="store_true", help="a few hundred images, 1 epoch (tests, CPU)")
    parser.add_argument(
        "--full",
        action="store_true",
        help="then `kdq pipeline` on the device: the fashion-mnist preset, its epochs cut to fit --full-budget-s "
        "at the speed preset_epoch measured",
    )
    parser.add_argument("--full-budget-s", type=float, default=FULL_BUDGET_S, help="--full's budget in seconds")
    parser.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=480,
        help="stop starting checks after this many seconds (default 480: a lent GPU's minutes are "
        "few); each check's JSON is written as it ends, so a killed run still leaves what ran",
    )
    parser.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("gpu-check: error: no CUDA device (torch.cuda.is_available() is False); --device cpu tries the "
              "script on the CPU", file=sys.stderr)  # fmt: skip
        return 2
    with tempfile.TemporaryDirectory(prefix="kdq-gpu-check-") as tmp:
        ctx = {"device": args.device, "cuda": cuda, "data_dir": args.data_dir, "run": Path(tmp) / "run",
               "tiny": args.tiny, "images": 500 if args.tiny else 10_000, "epochs": 1 if args.tiny else 3,
               "stream_images": 1_000 if args.tiny else 60_000, "timeout": 600 if args.tiny else 240,
               "deadline": time.monotonic() + args.deadline_s}  # fmt: skip
        checks = {}
        for name in args.only or CHECKS:
            checks[name] = run_check(name, ctx)
            # rewritten whole after each check: a run killed at its time limit still says what ran
            save_json({**header(args.device), "checks": checks, "partial": True},
                      args.out_dir / f"{RESULTS_NAME}-latest.json")  # fmt: skip
        if args.full:
            ctx.update(timeout=args.full_budget_s, deadline=time.monotonic() + args.full_budget_s)
            checks["full_pipeline"] = run_check("full_pipeline", {**ctx, "epoch_check": checks.get("preset_epoch")})
    result = {**header(args.device), "tiny": args.tiny, "checks": checks, "environment": machine()}
    path = write_results(RESULTS_NAME, result, args.out_dir)
    for part in tables(result):
        print(part if isinstance(part, str) else markdown_table(part))
    failed = [n for n, c in checks.items() if c["status"] == "failed"]
    print(f"gpu-check: {len(checks) - len(failed)} of {len(checks)} checks did not fail; {path}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
