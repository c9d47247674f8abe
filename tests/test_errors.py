"""The bad-input matrix (docs/errors.md): every case through the real CLI, each asserting the exact one-line
`Error: ...`, a non-zero exit, and that no file was lost or changed (inputs and outputs hashed before and after).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from kdq import checkpoint as ck
from kdq import cpu
from kdq.cli import main
from kdq.data import load_digits, split_validation
from kdq.models import build_model
from kdq.parity import main as parity_main
from kdq.presets import get_preset
from kdq.recipes import RunOptions, quantize_static

SMOKE = ["--preset", "smoke", "--width", "0.35", "--device", "cpu"]  # a student command
SMOKE_T = ["--preset", "smoke", "--device", "cpu"]  # a teacher command
# The smoke preset trains on the digits' training split less its validation tenth.
N_TRAIN = len(split_validation(load_digits(), get_preset("smoke").val_fraction, get_preset("smoke").seed).train)


def invoke(*args, command=main):
    return CliRunner().invoke(command, [str(a) for a in args])


def snapshot(*roots: Path) -> dict[str, str]:
    """Every file under `roots` (hidden and temp files included) -> sha256 of its bytes."""
    files = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir() and not any(p.iterdir()):
                files[str(p)] = "empty dir"
    return files


def fails(args, message: str | re.Pattern, *roots: Path, code: int = 1, command=main) -> str:
    """Run the CLI; it must exit `code` with `Error: message` as its one error line and leave `roots` untouched."""
    before = snapshot(*roots)
    result = invoke(*args, command=command)
    assert result.exit_code == code, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    if isinstance(message, re.Pattern):
        assert message.fullmatch(errors[0][len("Error: ") :]), errors[0]
    else:
        assert errors[0] == f"Error: {message}"
    if code == 1:  # a KdqError: nothing but the one line (no traceback, no usage text)
        assert result.output.strip().splitlines()[-1] == errors[0] and "Traceback" not in result.output
    assert snapshot(*roots) == before, "a file was created, changed or lost"
    return errors[0]


def write_images(root: Path, classes: list[str], per_class: int) -> Path:
    for i, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            Image.new("RGB", (20, 20), (40 * i, 7 * j, 255 - 40 * i)).save(root / c / f"{j}.png")
    return root


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A float student (1 epoch), its int8 PTQ, an unverified x86 export, and a 3-class teacher from an image folder."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("errors")
    run = root / "run"
    steps = [
        ["baseline", *SMOKE, "--epochs", "1", "--batch-size", "128", "--run-dir", run],
        ["quantize", run / "baseline" / "checkpoint.pt", "--calibration-batches", "2"],
        ["export", run / "baseline_ptq" / "checkpoint.pt", "--no-verify", "--out", root / "export"],
        ["teacher", *SMOKE_T, "--dataset", "folder", "--data-dir", write_images(root / "abc", list("abc"), 10),
         "--epochs", "1", "--batch-size", "4", "--run-dir", root / "abc-run"],
    ]  # fmt: skip
    for argv in steps:
        result = invoke(*argv)
        assert result.exit_code == 0, result.output
    torch.set_num_threads(threads)
    return root


# --- data --------------------------------------------------------------------------------------------------------


def test_missing_dataset_folder(tmp_path):
    fails(
        ["teacher", "--preset", "cifar10", "--data-dir", tmp_path / "nope", "--run-dir", tmp_path / "run"],
        f"CIFAR-10 not found in {tmp_path / 'nope' / 'cifar-10-batches-py'}; pass --download or set --data-dir to "
        "its parent",
        tmp_path,
    )
    fails(
        ["teacher", *SMOKE_T, "--dataset", "folder", "--data-dir", tmp_path / "nope", "--run-dir", tmp_path / "run"],
        f"image folder {tmp_path / 'nope'} not found; give --data-dir a folder of class folders",
        tmp_path,
    )


def test_fashion_mnist_nowhere_or_damaged(tmp_path, monkeypatch):
    import kdq.data

    from .test_data import fake_fashion

    monkeypatch.setattr(kdq.data, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    args = [
        "teacher",
        *SMOKE_T,
        "--dataset",
        "fashion-mnist",
        "--data-dir",
        tmp_path / "data",
        "--run-dir",
        tmp_path / "run",
    ]
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    fails(args, f"Fashion-MNIST not found in {raw} or {tmp_path / 'debian'}; pass --download, or install it: "
          "apt-get install dataset-fashion-mnist", tmp_path)  # fmt: skip
    fake_fashion(raw)  # generated files: not the real md5
    fails(args, f"{raw / 'train-images-idx3-ubyte.gz'}: md5 mismatch of its idx bytes (truncated, corrupt or "
          "modified); delete it and re-download (--download)", tmp_path)  # fmt: skip
    fake_fashion(tmp_path / "debian")
    (raw / "train-images-idx3-ubyte.gz").unlink()  # Debian's copy is found instead
    debian = tmp_path / "debian" / "train-images-idx3-ubyte.gz"
    fails(args, f"{debian}: md5 mismatch of its idx bytes (truncated, corrupt or modified); reinstall it: "
          "apt-get install --reinstall dataset-fashion-mnist", tmp_path)  # fmt: skip


def test_training_subset_larger_than_the_data(tmp_path):
    fails(
        ["teacher", *SMOKE_T, "--train-subset", "5000", "--run-dir", tmp_path / "run"],
        "train_subset must be in 1..1437, got 5000",
        tmp_path,
    )


@pytest.mark.parametrize("damage", ["truncated", "one byte changed"])
def test_damaged_cifar_batch(fake_cifar, tmp_path, damage):
    batch = fake_cifar / "cifar-10-batches-py" / "data_batch_1"
    data = batch.read_bytes()
    batch.write_bytes(data[:1000] if damage == "truncated" else data[:-1] + bytes([data[-1] ^ 1]))
    size = batch.stat().st_size
    fails(
        ["teacher", "--preset", "cifar10", "--data-dir", fake_cifar, "--run-dir", tmp_path / "run"],
        f"{batch}: md5 mismatch ({size} bytes: truncated, corrupt or modified); delete it and re-download",
        fake_cifar,
    )


def test_cifar_batch_missing_from_the_folder(fake_cifar, tmp_path):
    missing = fake_cifar / "cifar-10-batches-py" / "data_batch_1"
    missing.unlink()
    fails(
        ["distill", "--preset", "cifar10", "--data-dir", fake_cifar, "--run-dir", tmp_path / "run"],
        f"{missing} is missing; re-download CIFAR-10 with --download",
        fake_cifar,
    )


def test_corrupt_image_in_an_image_folder(tmp_path):
    images = write_images(tmp_path / "imgs", ["cat", "dog"], 6)
    (images / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    fails(
        ["teacher", *SMOKE_T, "--dataset", "folder", "--data-dir", images, "--run-dir", tmp_path / "run"],
        f"{images / 'dog' / 'bad.png'}: cannot decode image (UnidentifiedImageError); fix or remove it",
        tmp_path,
    )


# --- checkpoints -------------------------------------------------------------------------------------------------


def test_checkpoint_of_another_architecture(ws, tmp_path):
    saved = ck.load_checkpoint(ws / "run" / "baseline" / "checkpoint.pt")
    saved[ck.ARCH] = {"name": "resnet18", "num_classes": 10, "kwargs": {}}
    ck.save_checkpoint(saved, tmp_path / "resnet.pt")
    missing = [k for k in build_model("resnet18", 10).state_dict() if k not in saved[ck.MODEL]]
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]  # (BN tolerates those missing)
    fails(
        ["evaluate", tmp_path / "resnet.pt", "--out", tmp_path / "eval.json"],
        f"{tmp_path / 'resnet.pt'}: weights do not fit resnet18 (missing key(s) in state_dict: conv1.weight, "
        f"bn1.weight, ... ({len(missing)} in all))",
        tmp_path,
    )
    # Resuming a run as another architecture (here: another width) is refused before anything is loaded into it.
    fails(
        ["baseline", "--preset", "smoke", "--width", "0.5", "--epochs", "1", "--batch-size", "128", "--device", "cpu",
         "--run-dir", ws / "run", "--resume"],
        f"{ws / 'run' / 'baseline' / 'checkpoint.pt'}: cannot resume with other settings (arch.kwargs.width_mult "
        "0.35 -> 0.5); use the original options, or --overwrite to start over",
        ws,
    )  # fmt: skip


def test_checkpoint_with_another_number_of_classes(ws, tmp_path):
    teacher = ws / "abc-run" / "teacher" / "checkpoint.pt"
    message = f"{teacher} was trained on 3 classes ['a', 'b', 'c']..., the data has 10"
    # The 3-class teacher cannot teach the 10 digits, offline (soft targets) or online ...
    fails(["distill", *SMOKE, "--teacher", teacher, "--run-dir", tmp_path / "run"], message, tmp_path, ws)
    fails(["distill", *SMOKE, "--teacher", teacher, "--online", "--run-dir", tmp_path / "run"], message, tmp_path, ws)
    # ... nor be evaluated on a 2-class folder.
    two = write_images(tmp_path / "two", ["x", "y"], 5)
    fails(
        ["evaluate", teacher, "--data-dir", two, "--out", tmp_path / "e.json"],
        f"{teacher} was trained on 3 classes ['a', 'b', 'c']..., the data has 2",
        tmp_path,
        ws,
    )
    # Weights of a 3-class head under a 10-class description.
    saved = ck.load_checkpoint(teacher)
    saved[ck.ARCH] = {**saved[ck.ARCH], "num_classes": 10}
    ck.save_checkpoint(saved, tmp_path / "ten.pt")
    fails(
        ["evaluate", tmp_path / "ten.pt", "--out", tmp_path / "e.json"],
        f"{tmp_path / 'ten.pt'}: weights do not fit mobilenet_v2 (size mismatch for classifier.1.weight: "
        "copying a param with shape ([3, 1280]) from checkpoint, the shape in current model is ([10, 1280]))",
        tmp_path,
    )


def test_unreadable_checkpoints(ws, tmp_path):
    good = (ws / "run" / "baseline" / "checkpoint.pt").read_bytes()
    (tmp_path / "torn.pt").write_bytes(good[: len(good) // 2])
    fails(
        ["evaluate", tmp_path / "torn.pt", "--out", tmp_path / "e.json"],
        f"{tmp_path / 'torn.pt'}: not a readable checkpoint (truncated or corrupt: RuntimeError: PytorchStreamReader "
        "failed reading zip archive: failed finding central directory)",
        tmp_path,
    )
    torch.save({"model": {}}, tmp_path / "other.pt")
    fails(
        ["quantize", tmp_path / "other.pt"],
        f"{tmp_path / 'other.pt'}: not a kdq checkpoint (missing ['arch', 'normalization', 'classes', 'stage'])",
        tmp_path,
    )
    fails(
        ["evaluate", ws / "export" / "model.onnx", "--out", tmp_path / "e.json"],
        f"{ws / 'export' / 'model.onnx'} is not a kdq checkpoint (.onnx files are exported models)",
        tmp_path,
        ws,
    )
    fails(
        ["evaluate", ws / "export" / "model.pt", "--out", tmp_path / "e.json"],
        f"{ws / 'export' / 'model.pt'} is a TorchScript model, not a kdq checkpoint",
        tmp_path,
        ws,
    )


def test_distill_with_a_missing_teacher(tmp_path):
    fails(
        ["distill", *SMOKE, "--run-dir", tmp_path / "run"],
        f"teacher checkpoint {tmp_path / 'run' / 'teacher' / 'checkpoint.pt'} not found; run `kdq teacher` first or "
        "pass --teacher",
        tmp_path,
    )


# --- settings ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--alpha", "1.5"], "alpha must be in [0, 1], got 1.5"),
        (["--alpha", "-0.1"], "alpha must be in [0, 1], got -0.1"),
        (["--temperature", "0"], "temperature must be > 0, got 0.0"),
        (["--temperature", "-2"], "temperature must be > 0, got -2.0"),
        (["--epochs", "0", "--alpha", "0"], "epochs must be > 0, got 0"),
        (["--epochs", "-1", "--alpha", "0"], "epochs must be > 0, got -1"),
        (["--batch-size", "5000", "--alpha", "0"], f"batch size 5000 must be in 1..{N_TRAIN} (the training set size)"),
        (["--batch-size", "0", "--alpha", "0"], f"batch size 0 must be in 1..{N_TRAIN} (the training set size)"),
        (["--val-fraction", "1", "--alpha", "0"], "--val-fraction must be in [0, 1), got 1.0"),
    ],
)
def test_bad_settings(tmp_path, args, message):
    fails(["distill", *SMOKE, "--run-dir", tmp_path / "run", *args], message, tmp_path)


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(ws, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ws / "run" / "baseline", run / "baseline")  # a finished, good run
    kept = run / "baseline" / "checkpoint.pt"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fails(
            # --no-tensorboard: with it, the failed stage's curves up to the divergence are a new file in RUN/tb
            ["baseline", *SMOKE, "--epochs", "2", "--lr", "1e6", "--run-dir", run, "--overwrite", "--no-tensorboard"],
            re.compile(
                r"\[baseline\] loss became (nan|inf) in epoch 1; lower --lr "
                rf"\(last good checkpoint kept: {re.escape(str(kept))}\)"
            ),
            tmp_path,
        )
    finally:
        torch.set_num_threads(threads)
    assert ck.load_checkpoint(kept)[ck.DONE]  # the good run is intact, still loadable


def test_output_folder_not_writable(ws, tmp_path):
    (tmp_path / "file").write_text("a file where a folder should be")
    fails(
        ["baseline", *SMOKE, "--epochs", "1", "--run-dir", tmp_path / "file" / "run"],
        f"output folder {tmp_path / 'file' / 'run' / 'baseline'} is not writable (Not a directory); choose another "
        "--run-dir/--out",
        tmp_path,
    )
    # A read-only folder. Root ignores permissions, so as root the command runs with the effective uid of nobody.
    readonly = Path(tempfile.mkdtemp(prefix="kdq-ro-"))  # outside pytest's root-only tmp, so nobody can reach it
    readable_ckpt = readonly / "in" / "checkpoint.pt"
    try:
        readable_ckpt.parent.mkdir()
        shutil.copy(ws / "run" / "baseline" / "checkpoint.pt", readable_ckpt)
        readonly.chmod(0o555)
        as_nobody = os.geteuid() == 0
        if as_nobody:
            os.seteuid(65534)
        try:
            fails(
                ["baseline", *SMOKE, "--epochs", "1", "--run-dir", readonly],
                f"output folder {readonly / 'baseline'} is not writable (Permission denied); choose another "
                "--run-dir/--out",
                readonly,
            )
            fails(
                ["evaluate", readable_ckpt, "--out", readonly / "eval.json"],
                f"output folder {readonly} is not writable (Permission denied); choose another --run-dir/--out",
                readonly,
            )
        finally:
            if as_nobody:
                os.seteuid(0)
    finally:
        readonly.chmod(0o755)
        shutil.rmtree(readonly)


# --- outputs are never overwritten without --overwrite -----------------------------------------------------------


def test_existing_outputs_need_overwrite(ws, tmp_path):
    run, ckpt = ws / "run", ws / "run" / "baseline" / "checkpoint.pt"
    fails(
        ["baseline", *SMOKE, "--epochs", "1", "--batch-size", "128", "--run-dir", run],
        f"{ckpt} exists; pass --resume to continue it or --overwrite to replace it",
        ws,
    )
    fails(
        ["quantize", ckpt],
        f"{run / 'baseline_ptq' / 'checkpoint.pt'} exists; pass --overwrite to replace it",
        ws,
    )
    fails(
        ["export", run / "baseline_ptq" / "checkpoint.pt", "--no-verify", "--out", ws / "export"],
        f"{ws / 'export'} exists; pass --overwrite to replace it",
        ws,
    )
    (tmp_path / "eval.json").write_text("{}")
    fails(
        ["evaluate", ckpt, "--out", tmp_path / "eval.json"],
        f"{tmp_path / 'eval.json'} exists; pass --overwrite to replace it (or --out elsewhere)",
        tmp_path,
        ws,
    )
    torch.save({"logits": torch.zeros(3, 10)}, tmp_path / "soft_targets.pt")
    fails(
        ["soft-targets", *SMOKE_T, "--run-dir", tmp_path],
        f"{tmp_path / 'soft_targets.pt'} exists; pass --overwrite to recompute it",
        tmp_path,
    )


# --- export ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", ["0.96", "0.0"])
def test_momentum_the_onecycle_cycle_would_take_out_of_range(tmp_path, momentum):
    """Row 44: 0.96 would cycle past 1 (training diverges), 0.0 below 0; a CLI option is checked like a file."""
    fails(
        ["baseline", *SMOKE, "--momentum", momentum, "--run-dir", tmp_path / "run"],
        f"momentum: {float(momentum)!r} with the onecycle schedule, which cycles it by ±0.05, leaves [0, 1) (must "
        "be in [0.05, 0.95) for onecycle)",
        tmp_path,
    )


def test_a_cpu_identity_kdq_cannot_take(ws, tmp_path, monkeypatch):
    """Row 42: refused before the command starts, on either CPU kind (the CPU flags are the test's)."""
    ptq = ws / "run" / "baseline_ptq" / "checkpoint.pt"
    monkeypatch.setenv("KDQ_CPU", "avx512")
    fails(["export", ptq, "--out", tmp_path / "e"], "KDQ_CPU='avx512': choose from native, avx2, vnni", tmp_path, ws)
    monkeypatch.setenv("KDQ_CPU", "vnni")
    monkeypatch.setattr(cpu, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(cpu, "cpu_model", lambda: "AMD EPYC 7B13")
    fails(
        ["export", ptq, "--out", tmp_path / "e"],
        "KDQ_CPU=vnni on a CPU without AVX-512 VNNI (AMD EPYC 7B13): VNNI cannot be emulated (qemu-user has no "
        "AVX-512); this CPU's own run is the AVX2 one",
        tmp_path,
        ws,
    )


def test_a_target_file_that_says_what_kdq_would_not_do(ws, tmp_path):
    """Row 43: a typo in [latency], a gate turned off by `false`, a circle of `extends`."""
    ptq = ws / "run" / "baseline_ptq" / "checkpoint.pt"
    target, base = tmp_path / "my.toml", tmp_path / "base.toml"
    for text, message in (
        ('extends = "x86"\n[latency]\nround = 3\n',
         "unknown [latency] keys ['round']; choose from: batch_sizes, threads, rounds, warmup, runs"),
        ('extends = "x86"\n[gates]\ntorchscript_identical = false\n',
         "gate torchscript_identical is on when named (true); remove it to leave it out"),
        ('extends = "base.toml"\n', "`extends` goes round in a circle (my.toml -> base.toml)"),
        ('extends = "x86"\n[gates]\nort_top1_agreement_min = 0.99\n',
         "gates renamed when they became statistical: ort_top1_agreement_min -> ort_flip_rate_max (= 1 - the "
         "agreement; the confident margin is now in logit standard deviations, and confident flips are bounded by "
         "ort_confident_flip_rate_max)"),
    ):  # fmt: skip
        target.write_text(text)
        base.write_text('extends = "my.toml"\n')
        fails(["export", ptq, "--target", target, "--out", tmp_path / "e"], f"{target}: {message}", tmp_path, ws)


def test_diagnose_what_it_cannot_diagnose(ws, tmp_path):
    """Row 45: a float checkpoint, a PT2E checkpoint (a float layer is a module swap: eager only), a folder that is
    no export."""
    run = ws / "run"
    pt2e = quantize_static(run / "baseline" / "checkpoint.pt", tmp_path / "pt2e.pt", RunOptions(), batches=2,
                           flow="pt2e")  # fmt: skip
    for source, message in (
        (run / "baseline" / "checkpoint.pt", f"{run / 'baseline' / 'checkpoint.pt'} is a float checkpoint: nothing "
                                             "quantized to diagnose"),
        (pt2e, "diagnose: layer sensitivity needs an eager-flow checkpoint (PT2E graphs: not yet)"),
        (run, f"{run}: no manifest.json: not an export folder"),
    ):  # fmt: skip
        fails(["diagnose", source, "--out", tmp_path / "d"], message, tmp_path, ws)


def test_export_of_a_float_checkpoint(ws, tmp_path):
    ckpt = ws / "run" / "baseline" / "checkpoint.pt"
    fails(
        ["export", ckpt, "--out", tmp_path / "export"],
        f"{ckpt} is a float checkpoint; int8 export needs `kdq quantize` or `kdq distill --qat`",
        tmp_path,
        ws,
    )


def test_flow_and_backend_that_do_not_go_together(ws, tmp_path):
    student = ws / "run" / "baseline" / "checkpoint.pt"
    fails(
        ["quantize", student, "--backend", "xnnpack", "--out", tmp_path / "q.pt"],
        "the eager flow has no backend 'xnnpack'; choose from: x86, qnnpack (backend xnnpack is the pt2e flow's: "
        "--flow pt2e)",
        tmp_path,
        ws,
    )
    ckpt = ws / "run" / "baseline_ptq" / "checkpoint.pt"
    fails(
        ["export", ckpt, "--target", "x86-pt2e", "--out", tmp_path / "e"],
        f"{ckpt} comes from the eager flow, target 'x86-pt2e' exports the pt2e flow's models: quantize with "
        "`--flow pt2e` first",
        tmp_path,
        ws,
    )


def test_an_onnx_file_that_is_not_onnx(ws, tmp_path):
    """The export folder is checked against its manifest before anything in it is loaded."""
    folder = tmp_path / "export"
    shutil.copytree(ws / "export", folder)
    onnx_file = folder / "model.onnx"
    onnx_file.write_bytes(b"\x08\x07 this is not a protobuf " * 100)
    ckpt = ws / "run" / "baseline_ptq" / "checkpoint.pt"
    args = [folder, "--checkpoint", ckpt, "--out", tmp_path / "parity.json", "--latency-runs", "1"]
    digest = hashlib.sha256(onnx_file.read_bytes()).hexdigest()
    fails(
        args,
        f"{onnx_file}: sha256 {digest[:12]}… does not match the manifest "
        f"({json.loads((folder / 'manifest.json').read_text())['artifacts']['onnx']['sha256'][:12]}…); "
        "refusing to load it",
        tmp_path,
        command=parity_main,
    )
    # Even with a manifest rewritten to match it, a file that is not ONNX is named as such, in one line.
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["onnx"]["sha256"] = digest
    (folder / "manifest.json").write_text(json.dumps(manifest))
    fails(
        args,
        f"{onnx_file}: not a valid ONNX model ([ONNXRuntimeError] : 7 : INVALID_PROTOBUF : Load model from "
        f"{onnx_file} failed:Protobuf parsing failed.)",
        tmp_path,
        command=parity_main,
    )
    # A manifest that points outside its folder is refused, whatever the file holds.
    manifest["artifacts"]["onnx"]["file"] = "../../etc/passwd"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    fails(
        args,
        f"{folder / 'manifest.json'}: artifact name '../../etc/passwd' is not a plain file name",
        tmp_path,
        command=parity_main,
    )
    (folder / "manifest.json").unlink()
    fails(
        args,
        f"{folder / 'manifest.json'} not found: {folder} is not a kdq export folder",
        tmp_path,
        command=parity_main,
    )


def test_parity_against_another_checkpoint(ws, tmp_path):
    other = tmp_path / "other.pt"
    saved = ck.load_checkpoint(ws / "run" / "baseline_ptq" / "checkpoint.pt")
    saved[ck.STAGE] = "someone else's"
    ck.save_checkpoint(saved, other)
    fails(
        [ws / "export", "--checkpoint", other, "--out", tmp_path / "parity.json"],
        f"{other} is not the checkpoint {ws / 'export'} was exported from (sha256 differs)",
        tmp_path,
        ws,
        command=parity_main,
    )


# --- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["teacher", "--preset", "nope"], "Invalid value for '--preset': 'nope' is not one of 'cifar10', 'cifar100', "
         "'demo', 'fashion-mnist', 'fashion-mnist-cpu', 'smoke'."),
        (["teacher", "--arch", "resnet9"], "Invalid value for '--arch': 'resnet9' is not one of 'resnet8', "
         "'resnet14', 'resnet20', "
         "'resnet32', 'resnet56', 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'."),
        (["distill", "--dataset", "imagenet"], "Invalid value for '--dataset': 'imagenet' is not one of 'digits', "
         "'fashion-mnist', 'fashion-mnist-small', 'cifar10', 'cifar100', 'folder'."),
        (["distill", "--kd-loss", "dkd"], "Invalid value for '--kd-loss': 'dkd' is not one of 'hinton', 'dist'."),
        (["distill", "--kd-weighting", "mean"], "Invalid value for '--kd-weighting': 'mean' is not one of 'blend', "
         "'sum'."),
        (["quantize", "x.pt", "--backend", "riscv"], "Invalid value for '--backend': 'riscv' is not one of 'x86', "
         "'qnnpack', 'xnnpack'."),
        (["quantize", "x.pt", "--flow", "fx"], "Invalid value for '--flow': 'fx' is not one of 'eager', 'pt2e'."),
    ],
)  # fmt: skip
def test_unknown_names_list_the_valid_ones(tmp_path, args, message):
    fails(args, message, tmp_path, code=2)


def test_unknown_export_target_and_model_name(ws, tmp_path):
    ckpt = ws / "run" / "baseline_ptq" / "checkpoint.pt"
    fails(
        ["export", ckpt, "--target", "riscv", "--out", tmp_path / "e"],
        "unknown export target 'riscv'; choose from: arm, mobile, x86, x86-pt2e or a .toml path",
        tmp_path,
        ws,
    )
    saved = ck.load_checkpoint(ws / "run" / "baseline" / "checkpoint.pt")
    saved[ck.ARCH] = {"name": "vit_b_16", "num_classes": 10, "kwargs": {}}
    ck.save_checkpoint(saved, tmp_path / "vit.pt")
    fails(
        ["evaluate", tmp_path / "vit.pt", "--out", tmp_path / "e.json"],
        f"{tmp_path / 'vit.pt'}: cannot build its model {saved[ck.ARCH]} (unknown model 'vit_b_16'; choose from: "
        "resnet8, resnet14, resnet20, resnet32, resnet56, resnet18, resnet34, resnet50, resnet101, resnet152, "
        "mobilenet_v2, mobilenet_v2_hires)",
        tmp_path,
    )
