"""The stages of a kdq run, as functions the CLI and the tests call: teacher, soft targets,
student (distilled or baseline) and evaluation. Each reads and writes a run directory:

    RUN/teacher/{checkpoint.pt,history.json}
    RUN/soft_targets.pt
    RUN/baseline/...   RUN/student/...
    RUN/evaluation_results.json
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from kdq import checkpoint as ck
from kdq.artifacts import sha256
from kdq.config import MOBILENET_STUDENTS, Preset, stem_for
from kdq.data import Dataset, Normalize, load_dataset, load_test_split, resized, split_validation, subset_training
from kdq.evaluate import evaluate_model, predict_logits
from kdq.files import check_writable, save_json, save_torch
from kdq.models import build_model, load_start_weights
from kdq.quant import FLOAT_MODEL, QUANTIZATION, Scheme, default_scheme, get_flow, int8_model, is_quantized
from kdq.tblog import TB_DIR
from kdq.train import CHECKPOINT, Distill, Runtime, TrainingError, fit, setup_runtime

SOFT_TARGETS = "soft_targets.pt"
EVALUATION_JSON = "evaluation_results.json"


@dataclass(frozen=True)
class RunOptions:
    """Where and how to run, independent of the recipe."""

    data_dir: Path = Path("data")
    download: bool = False
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False
    compile: bool = False
    tensorboard: bool = True  # every stage's curves in RUN/tb/STAGE (kdq.tblog)

    def tensorboard_dir(self, run_dir: Path, stage: str) -> Path | None:
        return Path(run_dir) / TB_DIR / stage if self.tensorboard else None


def student_kwargs(preset: Preset) -> dict:
    """Width and dropout of a MobileNetV2 student; a CIFAR ResNet student has one width (`Preset` refuses another)
    and no dropout layer."""
    if preset.student in MOBILENET_STUDENTS:
        return {"width_mult": preset.student_width, "dropout": preset.student_dropout}
    return {}


def stem_kwargs(image_size: int) -> dict:
    """The model's stem for its input size (`kdq.config.stem_for`); the CIFAR stem is the default, so the arch
    record of a 32 px model is what it always was."""
    return {} if stem_for(image_size) == "cifar" else {"stem": stem_for(image_size)}


def load_data(preset: Preset, opts: RunOptions) -> Dataset:
    """The preset's dataset with its validation split carved out: every training stage sees the same three splits.
    Images are resized after the subset and the split are drawn (from the labels only): fewer to resize, and at
    224 px no second copy of the training images while the validation images are taken out."""
    size = preset.image_size
    data = load_dataset(preset.dataset, opts.data_dir, download=opts.download, image_size=size, resize=False)
    if preset.train_subset:
        data = subset_training(data, preset.train_subset)
    return resized(split_validation(data, preset.val_fraction, preset.seed), size)


def _start_from(model: torch.nn.Module, arch: str, source: str, stage: str) -> None:
    """Pretrained start (`Preset.teacher_weights` / `student_weights`); says what stayed at its fresh init."""
    if source:
        fresh = load_start_weights(model, arch, source)
        heads = sorted({k.rsplit(".", 1)[0] for k in fresh})
        print(f"[{stage}] starting from {source} weights; fresh init: {', '.join(heads) or 'nothing'}", file=sys.stderr)


def train_teacher(preset: Preset, run_dir: Path, opts: RunOptions) -> Path:
    rt = setup_runtime(opts.device)
    if rt.is_main:
        check_writable(Path(run_dir) / "teacher", create=False)  # before the data loads
    data = load_data(preset, opts)
    torch.manual_seed(preset.seed)
    arch = {"name": preset.teacher, "num_classes": len(data.classes), "kwargs": stem_kwargs(preset.image_size)}
    model = build_model(preset.teacher, len(data.classes), **arch["kwargs"])
    _start_from(model, preset.teacher, preset.teacher_weights, "teacher")
    fit(
        model,
        arch,
        data,
        preset.teacher_optim,
        preset.augment,
        Path(run_dir) / "teacher",
        stage="teacher",
        preset=preset.to_dict(),
        rt=rt,
        seed=preset.seed,
        resume=opts.resume,
        overwrite=opts.overwrite,
        compile=opts.compile,
        tensorboard=opts.tensorboard_dir(run_dir, "teacher"),
    )
    return Path(run_dir) / "teacher" / CHECKPOINT


def load_teacher(path: Path) -> tuple[torch.nn.Module, dict]:
    if not Path(path).is_file():
        raise ck.CheckpointError(f"teacher checkpoint {path} not found; run `kdq teacher` first or pass --teacher")
    ckpt = ck.load_checkpoint(path)
    return ck.model_from_checkpoint(ckpt, path), ckpt


def soft_targets_key(teacher_path: Path, data: Dataset) -> dict:
    """What soft targets are valid for: this very teacher file and these very training images, in this order.

    A retrained teacher (--overwrite, another --arch or --seed) or other training data gives another key, so
    stale logits are never reused.
    """
    digest = hashlib.sha256(data.train.images.contiguous().numpy().tobytes())
    digest.update(data.train.labels.numpy().tobytes())
    return {"teacher_sha256": sha256(Path(teacher_path)), "dataset": data.name, "train_sha256": digest.hexdigest()}


def compute_soft_targets(teacher_path: Path, data: Dataset, out: Path, device: str = "auto") -> Path:
    """The teacher's logits on every (unaugmented) training image, in dataset order, with their key."""
    teacher, ckpt = load_teacher(teacher_path)
    _check_same_data(ckpt, data, teacher_path)
    dev = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    teacher = teacher.to(dev, memory_format=torch.channels_last)
    logits = predict_logits(teacher, data.train.images, Normalize(**ckpt[ck.NORMALIZATION], device=dev))
    key = soft_targets_key(teacher_path, data)
    save_torch({"logits": logits, "teacher": str(teacher_path), "normalization": ckpt[ck.NORMALIZATION], **key}, out)
    print(f"[soft-targets] {tuple(logits.shape)} teacher logits -> {out}", file=sys.stderr)
    return Path(out)


def _check_same_data(ckpt: dict, data: Dataset, path: Path) -> None:
    if ckpt[ck.CLASSES] != data.classes:
        raise ck.CheckpointError(
            f"{path} was trained on {len(ckpt[ck.CLASSES])} classes "
            f"{ckpt[ck.CLASSES][:4]}..., the data has {len(data.classes)}"
        )
    size = data.test.images.shape[-1]
    if ck.input_size(ckpt) != size:
        raise ck.CheckpointError(
            f"{path} was trained on {ck.input_size(ckpt)} px images, the data is {size} px: use --image-size "
            f"{ck.input_size(ckpt)}"
        )


def train_student(
    preset: Preset,
    run_dir: Path,
    opts: RunOptions,
    *,
    stage: str = "student",
    teacher_path: Path | None = None,
    online: bool | None = None,
    qat: bool = False,
    init: Path | None = None,
) -> Path:
    """Distil the student from the teacher (alpha > 0) or train the baseline (alpha = 0).

    With `qat`, the student trains with fake quantization (the preset's `quant` recipe) while the same
    KD loss drives it, starting from the float checkpoint `init` when given. `online` None: the preset's.
    """
    run_dir = Path(run_dir)
    rt = setup_runtime(opts.device)
    if rt.is_main:
        check_writable(run_dir / stage, create=False)  # before the data and the teacher load
    data = load_data(preset, opts)
    distill = Distill(alpha=preset.alpha, temperature=preset.temperature, kd_loss=preset.kd_loss,
                      kd_weighting=preset.kd_weighting)  # fmt: skip
    if preset.alpha > 0:
        teacher_path = Path(teacher_path or run_dir / "teacher" / CHECKPOINT)
        if preset.kd_online if online is None else online:
            distill.teacher, tckpt = load_teacher(teacher_path)
            _check_same_data(tckpt, data, teacher_path)
            distill.taught_by = {"teacher_sha256": sha256(teacher_path)}
        else:
            distill.soft_targets, distill.taught_by = soft_targets_for(teacher_path, data, run_dir, opts, rt)
    torch.manual_seed(preset.seed)
    kwargs = {**student_kwargs(preset), **stem_kwargs(preset.image_size)}
    arch = {"name": preset.student, "num_classes": len(data.classes), "kwargs": kwargs}
    model = build_model(preset.student, len(data.classes), **kwargs)
    if not qat:  # QAT starts from the float student (`init`)
        _start_from(model, preset.student, preset.student_weights, stage)
    optim, extra, hook = preset.student_optim, None, None
    if qat:
        q = preset.quant
        if q.flow == "pt2e" and rt.world_size > 1:
            # kdq synchronizes BatchNorm modules across ranks (train.sync_batchnorm); a PT2E graph has none.
            raise TrainingError("PT2E QAT runs in one process: its batch norms are graph ops that kdq cannot "
                                "synchronize across ranks (use -j 1x1, or the eager flow)")  # fmt: skip
        float_weights = None
        if init is not None:
            ickpt = ck.load_checkpoint(init)
            _check_same_data(ickpt, data, init)
            model = ck.model_from_checkpoint(ickpt, init)
            arch, float_weights = ickpt[ck.ARCH], ickpt[ck.MODEL]
        flow = get_flow(q.flow)
        scheme = default_scheme(q.backend, q.activation_bits, q.weight_bits, flow=q.flow)
        model = flow.prepare(model, q.backend, qat=True, scheme=scheme, image_size=preset.image_size)
        optim = q.qat_optim
        extra = {
            QUANTIZATION: {
                "flow": flow.name,
                "backend": q.backend,
                "mode": "qat",
                "scheme": asdict(scheme),
                "init": str(init) if init else None,
            },  # fmt: skip
            FLOAT_MODEL: float_weights,
        }

        def hook(m, epoch):
            flow.qat_epoch_hook(m, epoch, optim.epochs, q.freeze_bn_after, q.freeze_observers_after)

    fit(
        model,
        arch,
        data,
        optim,
        preset.augment,
        run_dir / stage,
        stage=stage,
        preset=preset.to_dict(),
        rt=rt,
        distill=distill,
        seed=preset.seed,
        resume=opts.resume,
        overwrite=opts.overwrite,
        compile=opts.compile,
        extra=extra,
        on_epoch_start=hook,
        tensorboard=opts.tensorboard_dir(run_dir, stage),
    )
    return run_dir / stage / CHECKPOINT


def quantize_static(
    checkpoint: Path,
    out: Path,
    opts: RunOptions,
    backend: str = "x86",
    batches: int = 100,
    batch_size: int = 64,
    scheme: Scheme | None = None,
    flow: str = "eager",
) -> Path:
    """Post-training static quantization: observe `batches` training batches, store the calibrated model.

    `scheme` defaults to the flow and backend's (kdq.quant.DEFAULT_BITS: 7-bit activations on eager x86)."""
    out = Path(out)
    if out.exists() and not opts.overwrite:
        raise ck.CheckpointError(f"{out} exists; pass --overwrite to replace it")
    ckpt = ck.load_checkpoint(checkpoint)
    check_writable(out.parent)
    if is_quantized(ckpt):
        raise ck.CheckpointError(f"{checkpoint} is already quantized ({ckpt[QUANTIZATION]['mode']})")
    model = ck.model_from_checkpoint(ckpt, checkpoint)
    preset = Preset.from_dict(ckpt[ck.PRESET])
    data = load_data(preset, opts)
    _check_same_data(ckpt, data, checkpoint)
    flow = get_flow(flow)
    flow.check_available(backend)  # before the data loads
    scheme = scheme or default_scheme(backend, flow=flow.name)
    prepared = flow.prepare(model, backend, qat=False, scheme=scheme, image_size=preset.image_size)
    normalize = Normalize(**ckpt[ck.NORMALIZATION])
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(preset.seed))
    chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)][:batches]
    flow.calibrate(
        prepared,
        tqdm(
            (normalize(data.train.images[c]) for c in chunks),
            total=len(chunks),
            desc="calibrate",
            disable=None,
            leave=False,
            file=sys.stderr,
        ),
    )
    quantized = {
        **{k: v for k, v in ckpt.items() if k not in (ck.OPTIMIZER, ck.SCHEDULER, ck.RNG)},
        ck.MODEL: prepared.state_dict(),
        ck.STAGE: f"{ckpt[ck.STAGE]}_ptq",
        QUANTIZATION: {
            "flow": flow.name,
            "backend": backend,
            "mode": "ptq",
            "scheme": asdict(scheme),
            "calibration_batches": len(chunks),
            "source": str(checkpoint),
        },
        FLOAT_MODEL: ckpt[ck.MODEL],
    }
    ck.save_checkpoint(quantized, out)
    print(f"[quantize] {flow.name} {backend} PTQ calibrated on {len(chunks)} batches -> {out}", file=sys.stderr)
    return out


def soft_targets_for(
    teacher_path: Path, data: Dataset, run_dir: Path, opts: RunOptions, rt: Runtime
) -> tuple[torch.Tensor, dict]:
    """RUN/soft_targets.pt and its key, recomputed first (rank 0) unless it was made by this teacher file on
    this training data."""
    if not Path(teacher_path).is_file():  # the soft targets are only valid with the teacher that made them
        raise ck.CheckpointError(
            f"teacher checkpoint {teacher_path} not found; run `kdq teacher` first or pass --teacher"
        )
    path, key = run_dir / SOFT_TARGETS, soft_targets_key(teacher_path, data)
    saved = None  # other ranks read the file rank 0 checked (or wrote)
    if rt.is_main:
        saved = ck.load_weights(path, "soft targets file") if path.exists() else None
        stale = isinstance(saved, dict) and {k: saved.get(k) for k in key} != key
        if stale:
            print(f"[soft-targets] {path} was made by another teacher or on other data: recomputing", file=sys.stderr)
        if saved is None or stale:
            compute_soft_targets(teacher_path, data, path, opts.device)
            saved = None
    if rt.world_size > 1:
        torch.distributed.barrier()
    if saved is None:
        saved = ck.load_weights(path, "soft targets file")
    logits = saved.get("logits") if isinstance(saved, dict) else None
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or len(logits) != len(data.train):
        raise TrainingError(f"{path} is not a soft targets file for this data; delete it or run `kdq soft-targets`")
    return logits, key


def evaluate_checkpoints(paths: list[Path], opts: RunOptions, out: Path | None = None, latency_runs: int = 50) -> dict:
    """Evaluate float or int8 checkpoints on their dataset's test split; write evaluation_results.json."""
    if out is not None:
        check_writable(Path(out).parent, create=False)
    results = {}
    cache: dict[str, Dataset] = {}
    for path in paths:
        ckpt = ck.load_checkpoint(path)
        model = int8_model(ckpt, path) if is_quantized(ckpt) else ck.model_from_checkpoint(ckpt, path)
        preset = Preset.from_dict(ckpt[ck.PRESET])
        # the test split only: no validation split to carve (a small folder may be too small for one)
        key = f"{preset.dataset}@{preset.image_size}"
        data = cache.get(key) or cache.setdefault(
            key, load_test_split(preset.dataset, opts.data_dir, download=opts.download, image_size=preset.image_size)
        )
        _check_same_data(ckpt, data, path)
        metrics = evaluate_model(
            model, data.test, Normalize(**ckpt[ck.NORMALIZATION]), data.classes, latency_runs=latency_runs
        )
        taught_by = (ckpt.get(ck.RECIPE) or {}).get("taught_by", {}).get("teacher_sha256")
        results[ckpt[ck.STAGE]] = {"checkpoint": str(path), "sha256": sha256(Path(path)), "arch": ckpt[ck.ARCH]["name"],
                                   "taught_by": taught_by, **metrics}  # fmt: skip
    if out is not None:
        save_json(results, out)
    return results


def format_table(results: dict) -> str:
    rows = [("model", "arch", "test acc", "params", "size MB", "CPU ms (b1)", "img/s (b64)")]
    for stage, r in results.items():
        rows.append(
            (
                stage,
                r["arch"],
                f"{r['top1']:.2%}",
                f"{r['parameters'] / 1e6:.2f} M",
                f"{r['size_bytes'] / 1e6:.2f}",
                f"{r['latency_ms_b1']:.2f}",
                f"{r['throughput_img_s_b64']:.0f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
