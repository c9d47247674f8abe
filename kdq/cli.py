"""The `kdq` command line: thin shells over kdq.recipes, kdq.export, kdq.pipeline and kdq.report.

Only click and kdq.config are imported up front; each command imports the torch-backed code it runs,
so that `kdq --help` answers in a fraction of a second instead of ~10 s.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from kdq.config import (
    BACKENDS,
    CHECKPOINT,
    DATASETS,
    FLOWS,
    KD_LOSSES,
    KD_WEIGHTINGS,
    TEACHERS,
    Preset,
    qat_stage,
    with_overrides,
)
from kdq.cpu import identity
from kdq.errors import KdqError
from kdq.presets import PRESET_NAMES, RecipeError, get_preset, load_recipe


class KdqGroup(click.Group):
    """Turns every KdqError (and bad values, and OS errors) into `Error: <one line>` and exit code 1. A CPU
    identity kdq cannot take (`KDQ_CPU`, kdq.cpu) is refused before any command starts."""

    def invoke(self, ctx: click.Context):
        try:
            identity()
            return super().invoke(ctx)
        except (KdqError, ValueError, OSError) as e:
            raise click.ClickException(str(e).splitlines()[0] if str(e) else e.__class__.__name__) from e


def data_dir_option(help: str = "Dataset root."):
    return click.option(
        "--data-dir", type=click.Path(path_type=Path), default=Path("data"), envvar="KDQ_DATA_DIR", help=help
    )


def max_drop_option():
    return click.option(
        "--max-drop",
        type=click.FloatRange(0, 100, min_open=True),
        default=None,
        metavar="POINTS",
        help="Accuracy points int8 may lose against the float model, on validation images (0.5 = half a point); "
        "beyond it, the most sensitive convolutions are computed in float (eager flow). The certificate then "
        "judges the repaired model on the test split.  [default: no repair]",
    )


def run_options(f):
    """Options shared by every stage that trains or reads data."""
    decorators = [
        click.option(
            "--preset",
            type=click.Choice(PRESET_NAMES),
            default=None,
            help="Built-in recipe (recipes/PRESET.toml): data, architectures, epochs, learning rates, KD weights  "
            "[default: demo]",
        ),
        click.option(
            "--recipe",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help="Recipe file instead of a preset (start one with `kdq recipe show --preset demo > my.toml`); the "
            "options below still override it.",
        ),
        click.option(
            "--run-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Run directory holding every stage's outputs  [default: runs/RECIPE-NAME]",
        ),
        data_dir_option(
            "Dataset root: parent of torchvision's CIFAR/FashionMNIST folders (Fashion-MNIST also from Debian's "
            "dataset-fashion-mnist), or an image folder."
        ),
        click.option(
            "--dataset",
            type=click.Choice(DATASETS),
            default=None,
            help="Dataset instead of the preset's: folder = your own class folders under --data-dir  "
            "[default: the preset's]",
        ),
        click.option(
            "--download", is_flag=True, help="Download the dataset (CIFAR, Fashion-MNIST) if missing, md5-verified."
        ),
        click.option(
            "--image-size",
            type=click.IntRange(16, 1024),
            default=None,
            help="Square model input in pixels: every dataset is resized to it once at load time (class folders: "
            "shorter side to N, then the center N x N); up to 64 px the models use a CIFAR stem, above it the "
            "ImageNet stem  [default: the recipe's, 32]",
        ),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--resume", is_flag=True, help="Continue from the stage's checkpoint if there is one."),
        click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint instead of failing."),
        click.option("--compile", "compile_", is_flag=True, help="torch.compile the model (mostly useful on GPUs)."),
        click.option(
            "--tensorboard/--no-tensorboard",
            default=True,
            help="Write every stage's curves (loss parts, lr, train/val accuracy, images/s) to RUN_DIR/tb/: "
            "`tensorboard --logdir RUN_DIR/tb`.",
        ),
        click.option("--seed", type=int, default=None, help="Random seed  [default: the preset's]"),
        click.option(
            "--val-fraction",
            type=float,
            default=None,
            help="Fraction of each class of the training data held out (by --seed) for early stopping, "
            "choosing the best epoch and the per-epoch numbers; the test split is kept for the final evaluation. "
            "0 trains on everything, with no early stopping and the last epoch kept  [default: the preset's, 0.1]",
        ),
        click.option(
            "--train-subset",
            type=int,
            default=None,
            help="Train on a stratified subset of this many training images (the same for every seed; drawn "
            "before the validation split; the test split stays whole), e.g. to try a recipe on a CPU first  "
            "[default: the preset's, 0 = all]",
        ),
    ]
    for d in reversed(decorators):
        f = d(f)

    @functools.wraps(f)
    def wrapper(
        preset,
        recipe,
        run_dir,
        data_dir,
        dataset,
        download,
        image_size,
        device,
        resume,
        overwrite,
        compile_,
        tensorboard,
        seed,
        val_fraction,
        train_subset,
        **kwargs,
    ):
        from kdq.recipes import RunOptions

        p = with_overrides(_recipe(preset, recipe), seed=seed, dataset=dataset, val_fraction=val_fraction)
        p = with_overrides(p, train_subset=train_subset, image_size=image_size)
        opts = RunOptions(data_dir, download, device, resume, overwrite, compile_, tensorboard)
        return f(p, Path(run_dir or Path("runs") / p.name), opts, **kwargs)

    return wrapper


def _recipe(preset: str | None, recipe: Path | None) -> Preset:
    if preset and recipe:
        raise RecipeError("give --preset or --recipe, not both")
    return load_recipe(recipe) if recipe else get_preset(preset or "demo")


def optim_options(f):
    """The training recipe's knobs; the command receives them as `optim` (Optim fields) and `augment` (Augment
    fields) dicts of the options given, to apply over the preset's stage recipe."""
    for d in reversed(
        [
            click.option("--epochs", type=int, default=None, help="Epochs  [default: the preset's]"),
            click.option("--lr", type=float, default=None, help="Peak learning rate  [default: the preset's]"),
            click.option("--batch-size", type=int, default=None, help="Global batch size  [default: the preset's]"),
            click.option(
                "--momentum",
                type=float,
                default=None,
                help="SGD (Nesterov) momentum; with the onecycle schedule the centre of its cycle (±0.05, lowest at "
                "the peak lr)  [default: 0.9]",
            ),
            click.option(
                "--label-smoothing",
                type=float,
                default=None,
                help="Label smoothing of the hard-label loss term  [default: the preset's, 0]",
            ),
            click.option(
                "--cutmix",
                type=float,
                default=None,
                help="CutMix with this Beta alpha (e.g. 1.0); with KD it needs --online  [default: the preset's, off]",
            ),
            click.option(
                "--mixup",
                type=float,
                default=None,
                help="MixUp with this Beta alpha (e.g. 0.2); with KD it needs --online  [default: the preset's, off]",
            ),
        ]
    ):
        f = d(f)

    @functools.wraps(f)
    def wrapper(*args, epochs, lr, batch_size, momentum, label_smoothing, cutmix, mixup, **kwargs):
        optim = dict(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum, label_smoothing=label_smoothing)
        return f(*args, optim=optim, augment=dict(cutmix_alpha=cutmix, mixup_alpha=mixup), **kwargs)

    return wrapper


@click.group(cls=KdqGroup, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="kdq")
def main() -> None:
    """kdq: distill a big image classifier into a small, fast, verified int8 model.

    \b
    Quick start (offline, CPU, a few minutes):
      kdq pipeline --preset demo
    Step by step:
      kdq teacher --preset cifar10 --download
      kdq soft-targets --preset cifar10
      kdq baseline --preset cifar10
      kdq distill --preset cifar10
      kdq evaluate runs/cifar10/*/checkpoint.pt
    """


def weights_options(model: str):
    """--pretrained / --weights FILE: where the model's training starts (the recipe's `MODEL_weights`)."""

    def decorate(f):
        f = click.option(
            "--weights",
            "weights_file",
            type=click.Path(path_type=Path, dir_okay=False),
            default=None,
            help=f"Start the {model} from this state_dict file (torchvision's format or a kdq checkpoint): tensors "
            "whose name and shape fit are loaded, the stem is re-initialized.",
        )(f)
        f = click.option(
            "--pretrained",
            is_flag=True,
            help=f"Start the {model} from torchvision's ImageNet weights (downloaded once into the torch hub cache; "
            "offline, read from it). The CIFAR stem and the classifier start fresh  [default: the recipe's]",
        )(f)

        @functools.wraps(f)
        def wrapper(*args, pretrained: bool, weights_file: Path | None, **kwargs):
            if pretrained and weights_file:
                raise KdqError("give --pretrained or --weights, not both")
            weights = "imagenet" if pretrained else str(weights_file) if weights_file else None
            return f(*args, weights=weights, **kwargs)

        return wrapper

    return decorate


@main.command()
@run_options
@optim_options
@click.option("--arch", type=click.Choice(TEACHERS), default=None, help="Teacher  [default: the preset's]")
@weights_options("teacher")
def teacher(preset: Preset, run_dir: Path, opts, optim, augment, arch, weights) -> None:
    """Train the teacher (a CIFAR-stem ResNet) -> RUN/teacher/checkpoint.pt."""
    from kdq import recipes

    preset = with_overrides(
        preset,
        teacher=arch,
        teacher_weights=weights,
        teacher_optim=with_overrides(preset.teacher_optim, **optim),
        augment=with_overrides(preset.augment, **augment),
    )
    path = recipes.train_teacher(preset, run_dir, opts)
    click.echo(path)


@main.command("soft-targets")
@run_options
@click.option(
    "--teacher",
    "teacher_path",
    type=click.Path(path_type=Path),
    default=None,
    help="Teacher checkpoint  [default: RUN/teacher/checkpoint.pt]",
)
def soft_targets(preset: Preset, run_dir: Path, opts, teacher_path) -> None:
    """Precompute the teacher's logits on the training set -> RUN/soft_targets.pt (offline KD)."""
    from kdq import recipes
    from kdq.files import check_writable

    out = run_dir / recipes.SOFT_TARGETS
    if out.exists() and not opts.overwrite:
        raise KdqError(f"{out} exists; pass --overwrite to recompute it")
    check_writable(out.parent)
    data = recipes.load_data(preset, opts)
    click.echo(recipes.compute_soft_targets(teacher_path or run_dir / "teacher" / CHECKPOINT, data, out, opts.device))


def _student_options(f):
    for d in reversed(
        [
            run_options,
            optim_options,
            click.option("--temperature", type=float, default=None, help="KD temperature T  [default: the preset's]"),
            click.option("--dropout", type=float, default=None, help="Student dropout  [default: the preset's]"),
            click.option(
                "--width",
                type=float,
                default=None,
                help="MobileNetV2 student's width multiplier  [default: the preset's]",
            ),  # fmt: skip
            click.option(
                "--teacher",
                "teacher_path",
                type=click.Path(path_type=Path),
                default=None,
                help="Teacher checkpoint  [default: RUN/teacher/checkpoint.pt]",
            ),
            click.option(
                "--online/--offline",
                default=None,
                help="Online: the teacher runs on every augmented batch, seeing what the student sees. Offline: its "
                "logits on the unaugmented images, RUN/soft_targets.pt (computed first if missing)  "
                "[default: the preset's]",
            ),
            click.option(
                "--kd-loss",
                type=click.Choice(KD_LOSSES),
                default=None,
                help="The teacher term: hinton (KL of the softened distributions) or dist (Pearson correlation of "
                "them across classes and across the batch, Huang et al. 2022)  [default: the preset's]",
            ),
            click.option(
                "--kd-weighting",
                type=click.Choice(KD_WEIGHTINGS),
                default=None,
                help="How alpha weighs the teacher term: blend (alpha * teacher + (1 - alpha) * cross-entropy) or "
                "sum (cross-entropy + alpha * teacher, the DIST paper's form)  [default: the preset's, blend]",
            ),
            click.option(
                "--stage",
                default=None,
                help="Output folder under RUN  [default: student, baseline, or student_qat (student_qat_pt2e_BACKEND "
                "for --flow pt2e)]",
            ),
            click.option(
                "--qat", is_flag=True, help="Quantization-aware training with the same KD loss (preset's quant recipe)."
            ),
            click.option(
                "--init",
                type=click.Path(path_type=Path),
                default=None,
                help="With --qat: float checkpoint to fine-tune  [default: RUN/student/checkpoint.pt if it exists]",
            ),
            click.option(
                "--backend",
                type=click.Choice(BACKENDS),
                default=None,
                help="With --qat: int8 kernels to train for: x86; for ARM qnnpack (eager flow, --target arm) or "
                "xnnpack (pt2e flow, ExecuTorch, --target mobile)  [default: the preset's, x86]",
            ),
            flow_option("With --qat: "),
            weights_options("student"),
        ]
    ):
        f = d(f)
    return f


def flow_option(when: str = ""):
    return click.option(
        "--flow",
        type=click.Choice(FLOWS),
        default=None,
        help=f"{when}quantization flow: eager (torch.ao.quantization: TorchScript + ONNX) or pt2e (torch.export + "
        "torchao: ONNX through the dynamo exporter, .pt2, ExecuTorch .pte)  [default: the preset's, eager]",
    )


def _train_student(
    preset,
    run_dir,
    opts,
    alpha,
    optim,
    augment,
    temperature,
    dropout,
    width,
    teacher_path,
    online,
    kd_loss,
    kd_weighting,
    stage,
    qat,
    init,
    backend,
    flow,
    weights,
) -> None:
    from kdq import recipes
    from kdq.losses import KDLoss
    from kdq.quant import get_flow

    changes = optim
    preset = with_overrides(
        preset,
        alpha=alpha,
        temperature=temperature,
        student_dropout=dropout,
        student_width=width,
        kd_loss=kd_loss,
        kd_weighting=kd_weighting,
    )
    preset = with_overrides(preset, student_weights=weights)
    preset = with_overrides(preset, augment=with_overrides(preset.augment, **augment))
    if (backend or flow) and not qat:
        raise KdqError("--backend and --flow apply to --qat training only (a float student has no int8 kernels)")
    if qat:
        qat_optim = with_overrides(preset.quant.qat_optim, **changes)
        quant = with_overrides(preset.quant, qat_optim=qat_optim, backend=backend, flow=flow)
        get_flow(quant.flow).check_available(quant.backend)  # before anything trains
        preset = with_overrides(preset, quant=quant)
        default_init = run_dir / "student" / CHECKPOINT
        init = init or (default_init if default_init.exists() else None)
    else:
        preset = with_overrides(preset, student_optim=with_overrides(preset.student_optim, **changes))
    KDLoss(preset.alpha, preset.temperature, kind=preset.kd_loss, weighting=preset.kd_weighting)  # before any data
    stage = stage or (
        qat_stage(preset.quant.flow, preset.quant.backend) if qat else "student" if preset.alpha > 0 else "baseline"
    )
    click.echo(
        recipes.train_student(
            preset, run_dir, opts, stage=stage, teacher_path=teacher_path, online=online, qat=qat, init=init
        )
    )


@main.command()
@_student_options
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Weight of the teacher's soft targets in [0, 1]; 0 trains the baseline  [default: the preset's]",
)
@click.option(
    "--require-teacher-ahead",
    is_flag=True,
    help="Stop unless RUN/teacher's best validation accuracy is above RUN/baseline's (both must be trained), "
    "as `kdq pipeline --require-teacher-ahead` does.",
)
def distill(preset: Preset, run_dir: Path, opts, alpha, require_teacher_ahead, **kwargs) -> None:
    """Distil the recipe's student from the teacher -> RUN/student/checkpoint.pt.

    Loss (--kd-weighting blend): alpha * T^2 * KL(teacher/T || student/T) + (1 - alpha) * CE(student, labels);
    sum: CE + alpha * the teacher term (the DIST paper's form).
    """
    if require_teacher_ahead:
        from kdq.pipeline import check_teacher_ahead

        check_teacher_ahead(run_dir, required=True)
    _train_student(preset, run_dir, opts, alpha, **kwargs)


@main.command()
@_student_options
def baseline(preset: Preset, run_dir: Path, opts, **kwargs) -> None:
    """Train the same student with the same recipe but no teacher (alpha = 0) -> RUN/baseline."""
    _train_student(preset, run_dir, opts, 0.0, **kwargs)


@main.command()
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="x86",
    help="x86 (servers); ARM: qnnpack (eager flow) or xnnpack (pt2e flow, ExecuTorch).",
)
@flow_option()
@click.option("--calibration-batches", type=int, default=None, help="Batches to observe  [default: the preset's]")
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output checkpoint  [default: RUN/<stage>_ptq/checkpoint.pt, RUN/<stage>_ptq_qnnpack/... for qnnpack]",
)
@data_dir_option()
@max_drop_option()
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
def quantize(checkpoint: Path, backend, flow, calibration_batches, out, data_dir, max_drop, overwrite) -> None:
    """Static post-training quantization of a float student checkpoint (per-channel int8 weights).

    \b
    With --max-drop, also repair: the most sensitive convolutions are computed in float, one at a time in
    `kdq diagnose`'s order, until int8 is within the budget on validation images. An eager int8 checkpoint
    (a QAT student) is repaired as it is, into RUN/<stage>_repaired/checkpoint.pt.
    """
    from kdq import checkpoint as ck
    from kdq import recipes
    from kdq.quant import is_quantized
    from kdq.repair import repair

    ckpt = ck.load_checkpoint(checkpoint)
    if is_quantized(ckpt) and max_drop is not None:
        out = out or checkpoint.parent.parent / f"{ckpt[ck.STAGE]}_repaired" / CHECKPOINT
        _refuse_existing(out, overwrite)
        click.echo(repair(checkpoint, out, max_drop / 100, data_dir)[0])
        return
    preset = Preset.from_dict(ckpt[ck.PRESET])
    flow = flow or preset.quant.flow
    suffix = "".join(f"_{v}" for v in (flow, backend) if v not in ("eager", "x86"))  # _ptq, _ptq_pt2e_xnnpack, ...
    out = out or checkpoint.parent.parent / f"{ckpt[ck.STAGE]}_ptq{suffix}" / CHECKPOINT
    opts = recipes.RunOptions(data_dir=data_dir, overwrite=overwrite)
    batches = calibration_batches or preset.quant.calibration_batches
    quantized = recipes.quantize_static(checkpoint, out, opts, backend=backend, batches=batches, flow=flow)
    if max_drop is not None:
        quantized = repair(quantized, quantized, max_drop / 100, data_dir)[0]
    click.echo(quantized)


def _refuse_existing(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise KdqError(f"{out} exists; pass --overwrite to replace it")


@main.command()
@click.argument("checkpoints", nargs=-1, required=True, type=click.Path(path_type=Path))
@data_dir_option()
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Write the results JSON here  [default: evaluation_results.json beside the first checkpoint's run]",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing results JSON.")
def evaluate(checkpoints, data_dir, out, overwrite) -> None:
    """Accuracy, per-class accuracy, confusion matrix, size and CPU latency of checkpoints; with a `baseline`
    and a `student` among them, the KD student's gain on the same images, with its paired interval."""
    from kdq import recipes
    from kdq.evaluate import paired_gain

    out = out or Path(checkpoints[0]).parent.parent / recipes.EVALUATION_JSON
    if out.exists() and not overwrite:
        raise KdqError(f"{out} exists; pass --overwrite to replace it (or --out elsewhere)")
    results = recipes.evaluate_checkpoints(list(checkpoints), recipes.RunOptions(data_dir=data_dir), out)
    click.echo(recipes.format_table(results))
    if (gain := paired_gain(results)) is not None:  # a baseline and a KD student among them
        click.echo(f"Knowledge distillation: {gain.sentence()}")
    click.echo(f"-> {out}")


@main.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option(
    "--target",
    default="x86",
    show_default=True,
    help="Export target: a name from export/*.toml (x86, arm) or a path to a .toml file.",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=None,
    help="Output folder  [default: RUN/export-TARGET beside the checkpoint's stage folder]",
)
@data_dir_option("Dataset root (the parity run uses the checkpoint's test split).")
@click.option(
    "--verify/--no-verify",
    default=True,
    help="Certify parity and latency against the target's gates (skip only on request).",
)
@click.option("--latency-runs", type=int, default=None, help="Timed runs per latency cell  [default: the target's]")
@click.option("--overwrite", is_flag=True, help="Replace an existing export folder.")
def export_cmd(checkpoint: Path, target, out, data_dir, verify, latency_runs, overwrite) -> None:
    """Export an int8 checkpoint to TorchScript + ONNX with a manifest, and certify parity.

    \b
    Writes OUT/model.pt, OUT/model.onnx, OUT/manifest.json, OUT/parity.json, OUT/parity.md.
    A failed gate exits non-zero and keeps the candidate in OUT.rejected.
    """
    from kdq.artifacts import load_target
    from kdq.export import export
    from kdq.parity import format_report

    t = load_target(target)
    out = out or checkpoint.parent.parent / f"export-{t.name}"
    try:
        report = export(
            checkpoint, out, t, data_dir=data_dir, verify=verify, overwrite=overwrite, latency_runs=latency_runs
        )
    except KdqError:
        rejected = out.with_name(out.name + ".rejected") / "parity.md"
        if rejected.exists():
            click.echo(rejected.read_text(), err=True)
        raise
    if report:
        click.echo(format_report(report))
    click.echo(f"-> {out}")


@main.command("plan")
@click.option("--target", default="x86", help="Export target whose runtime and int8 flow time the candidates.")
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), required=True,
              help="Latency budget: int8 milliseconds per batch, on this CPU.")  # fmt: skip
@click.option("--batch", type=click.IntRange(min=1), default=1, help="Images per call.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="ONNX Runtime intra-op threads.")
@click.option("--image-size", type=click.IntRange(16, 1024), default=32, help="Model input, px (square).")
@click.option("--classes", type=click.IntRange(min=2), default=10, help="Classifier outputs.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, help="Interleaved timing rounds.")
@click.option("--runs", type=click.IntRange(min=1), default=20, help="Timed calls per model per round.")
@click.option(
    "--candidate",
    "candidates",
    multiple=True,
    metavar="NAME",
    help="Time only these (repeat the option)  [default: every one: mobilenet_v2_x0.35 ... resnet20]",
)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="JSON file  [default: runs/plan/TARGET-bBATCH-tTHREADS.json]")  # fmt: skip
def plan_cmd(target, budget_ms, batch, threads, image_size, classes, rounds, runs, candidates, out) -> None:
    """Time every student candidate's int8 and fp32 model on this CPU; mark those within a latency budget.

    \b
    Candidates: MobileNetV2 (both layouts) at widths 0.35, 0.5, 0.75 and 1.0, and CIFAR ResNet-8, -14 and -20.
    Latency needs no training: each is built untrained, made int8 by the target's flow (PTQ on random images),
    exported to ONNX and timed in ONNX Runtime; a figure is the median of interleaved rounds.
    Prints the table, fastest first, and writes it as JSON.
    """
    from tqdm import tqdm

    from kdq import plan
    from kdq.artifacts import load_target
    from kdq.files import check_writable, save_json

    t = load_target(target)
    plan.check_target(t)
    family = plan.candidates(candidates)
    out = out or Path("runs") / "plan" / f"{t.name}-b{batch}-t{threads}.json"
    check_writable(out.parent)
    with tqdm(total=len(family) + rounds, desc="kdq plan", disable=None) as bar:

        def progress(what: str) -> None:
            bar.set_postfix_str(what)
            bar.update()

        result = plan.run_plan(family, t, budget_ms, batch=batch, threads=threads, image_size=image_size,
                               num_classes=classes, rounds=rounds, runs=runs, progress=progress)  # fmt: skip
    save_json(result, out)
    click.echo(plan.format_table(result))
    click.echo(f"-> {out}")


@main.command()
@run_options
@click.option("--latency-runs", type=int, default=None, help="Export certificate: timed runs per latency cell.")
@click.option(
    "--target",
    default=None,
    help="Export target name or .toml path; its flow and backend are the QAT stage's  [default: the preset's: "
    "x86 (eager, x86), arm (eager, qnnpack), x86-pt2e (pt2e, x86) or mobile (pt2e, xnnpack)]",
)
@flow_option()
@click.option(
    "--require-teacher-ahead",
    is_flag=True,
    help="Stop before distilling when the teacher's validation accuracy is not above the no-KD baseline's "
    "(without it: a loud warning, and the report shows the comparison).",
)
@max_drop_option()
def pipeline(preset: Preset, run_dir: Path, opts, latency_runs, target, flow, require_teacher_ahead, max_drop) -> None:
    """Run every stage: teacher -> baseline -> (teacher ahead?) -> KD student -> QAT -> (repair) -> table -> export.

    With --resume, finished stages are skipped and an interrupted one continues.
    """
    from kdq.pipeline import run_pipeline

    drop = None if max_drop is None else max_drop / 100
    run_pipeline(preset, run_dir, opts, latency_runs, target, require_teacher_ahead, flow, drop)


@main.command()
@run_options
@click.option("--budget-ms", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Latency budget: int8 ms per batch of --batch images on this CPU (steps all, prepare).")  # fmt: skip
@click.option("--target", default="x86", help="Export target: its runtime times the models, its flow trains them.")
@click.option("--batch", type=click.IntRange(min=1), default=1, help="Images per call, for the budget.")
@click.option("--threads", type=click.IntRange(min=1), default=1, help="ONNX Runtime intra-op threads, for the budget.")
@click.option("--rounds", type=click.IntRange(min=1), default=3, help="Interleaved timing rounds.")
@click.option("--runs", type=click.IntRange(min=1), default=20, help="Timed calls per model per round.")
@click.option("--candidate", "candidates", multiple=True, metavar="NAME",
              help="Plan only these (repeat the option)  [default: the whole family of `kdq plan`]")  # fmt: skip
@click.option("--step", type=click.Choice(["all", "prepare", "train", "gather"]), default="all",
              help="One step (a cluster runs `train` as parallel jobs: deploy/sweep.py): prepare = plan + teacher + "
              "soft targets; train = candidates (--only); gather = int8 teacher, front, choice, report.")  # fmt: skip
@click.option(
    "--only",
    multiple=True,
    metavar="NAME",
    help="--step train/gather: these candidates  [default: every one within budget in RUN/sweep/plan.json]",
)
@click.option(
    "--index",
    type=click.IntRange(min=0),
    default=None,
    help="--step train: the candidate at this index among those within budget (one cluster job each); past the "
    "last, nothing to do.",
)
@click.option("--latency-runs", type=int, default=None, help="Export certificates: timed runs per latency cell.")
def sweep(preset: Preset, run_dir: Path, opts, budget_ms, target, batch, threads, rounds, runs, candidates, step, only,
          index, latency_runs) -> None:  # fmt: skip
    """From a latency budget on this CPU to the most accurate certified int8 model within it.

    \b
    1. time every candidate student untrained (as `kdq plan`); keep those within --budget-ms;
    2. train the teacher and its soft targets once;
    3. distil, QAT-train and certify each candidate under the recipe (RUN/sweep/NAME);
    4. quantize the teacher too (PTQ, certified), measure every exported model's test accuracy and latency,
       and draw the accuracy-vs-latency front (RUN/sweep.json, RUN/report.md).
    It recommends the most accurate certified student within budget, unless quantizing the teacher is as good:
    the int8 teacher wins when it fits the budget and the student is not ahead of it on the same test images.
    """
    from kdq import sweep as sw

    settings = dict(batch=batch, threads=threads, rounds=rounds, runs=runs, names=candidates)
    if step in ("all", "prepare") and budget_ms is None:
        raise click.UsageError(f"--step {step} needs --budget-ms")
    if index is not None and step != "train":
        raise click.UsageError("--index picks the candidate of --step train")
    if step == "all":
        sw.run_sweep(preset, run_dir, opts, target, budget_ms, latency_runs, **settings)
    elif step == "prepare":
        sw.prepare(preset, run_dir, opts, target, budget_ms, **settings)
    elif step == "train":
        names = only or sw.within_budget(run_dir)
        if index is not None:
            if index >= len(names):
                click.echo(f"candidate {index}: only {len(names)} within budget, nothing to train")
                return
            names = [names[index]]
        for name in names:
            sw.train_candidate(preset, run_dir, opts, target, name, latency_runs)
    else:
        sw.gather(preset, run_dir, opts, target, latency_runs, only or None)


@main.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@data_dir_option()
@click.option("--samples", type=click.IntRange(min=16), default=512, help="Validation images to measure on.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for diagnosis.json/.md/.png  [default: SOURCE's folder]")  # fmt: skip
def diagnose(source: Path, data_dir: Path, samples: int, out: Path | None) -> None:
    """Find the layers an int8 model's error comes from, and where ONNX Runtime parts from PyTorch.

    \b
    SOURCE: an export folder (its manifest names the checkpoint) or a quantized checkpoint.
    Measured on SAMPLES images of the recipe's validation split, never the test split:
    - sensitivity: each convolution alone computed in float (its output grid recalibrated on
      training images), its SQNR gain against the float forward (eager QAT and PTQ checkpoints);
      `kdq quantize --max-drop` puts layers in float in this order;
    - divergence: every convolution's int8 output in PyTorch and in ONNX Runtime, in LSB,
      naming the first beyond 1 LSB (eager exports with ONNX).
    A rejected export gets this diagnosis in OUT.rejected/ by itself.
    """
    from kdq import diagnose as diag

    result = diag.diagnose(source, data_dir, samples)
    click.echo(diag.format_diagnosis(result))
    files = diag.write_diagnosis(result, out or (source if source.is_dir() else source.parent))
    click.echo(f"-> {', '.join(map(str, files))}")


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Output folder  [default: RUN_DIR]"
)
def report(run_dir: Path, out: Path | None) -> None:
    """Write RUN_DIR/report.md and a self-contained report.html with plots of a run.

    \b
    Plots (OUT/plots/*.png): training curves of every stage, the final int8 model's confusion
    matrix and per-class accuracy, accuracy vs size vs latency of all models, export latency.
    Every number comes from the run's JSON files (history, evaluation results, parity).
    """
    from kdq.report import write_report

    md, page = write_report(run_dir, out)
    click.echo(md)
    click.echo(page)


@main.group()
def recipe() -> None:
    """Recipe files: every setting of a job (data, models, optimisation, augmentation, KD, quantization)."""


@recipe.command("show")
@click.option("--preset", type=click.Choice(PRESET_NAMES), default=None, help="Built-in recipe  [default: demo]")
@click.option(
    "--recipe", "recipe_file", type=click.Path(path_type=Path, dir_okay=False), default=None, help="A recipe file."
)
def recipe_show(preset: str | None, recipe_file: Path | None) -> None:
    """Print a recipe with every field filled in, as a file `--recipe` reads back.

    \b
      kdq recipe show --preset cifar10 > my.toml     # edit, e.g. [student_optim] weight_decay = 1e-4
      kdq pipeline --recipe my.toml                  # options given on the command line still override it
    """
    from kdq.presets import recipe_toml

    click.echo(recipe_toml(_recipe(preset, recipe_file)), nl=False)


if __name__ == "__main__":
    sys.exit(main())
