"""Parity certificate of an export folder, run in a fresh process: `python -m kdq.parity EXPORT_DIR ...`.

Loads every artifact independently (after checking its sha256 against the manifest), then stages:
1. accuracy: the whole test split through the float model the checkpoint came from and every int8 runtime
   (PyTorch, TorchScript, ONNX Runtime) on this CPU's own int8 path, and on each extra path the target
   names (`kdq.cpu`: "avx2" = the int16-saturating kernels of CPUs without VNNI, forced or emulated;
   "exact" = ONNX Runtime's non-saturating kernels);
2. agreement of every int8 runtime with PyTorch int8, and the int8 kernels ONNX Runtime really runs;
3. latency of each runtime in fp32 and int8, in interleaved rounds (A B A B ...), so that a ratio compares
   two runtimes measured in the same round at the same thread count;
4. every gate the target names (`kdq.artifacts.GATES`); a gate whose inputs are missing fails and says why.
   Accuracy-type gates are statistical statements on the paired per-image outcomes (`kdq.stats`): each passes,
   fails, or is not proven on this many test images; the certificate's verdict is certified, rejected or not proven.
Writes parity.json, including where it was measured; `format_report` renders it as Markdown.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

from kdq import checkpoint as ck
from kdq import pt2e, pt2e_export
from kdq.artifacts import ARTIFACTS, CERTIFIED, RATIO_GATES, REJECTED, ExportError, sha256, verify_artifacts
from kdq.artifacts import NOT_PROVEN as UNPROVEN
from kdq.config import Preset
from kdq.cpu import (
    AVX2_ENV,
    FBGEMM_ISA_ENV,
    IDENTITY_ENV,
    ORT_EXACT_U8S8,
    describe,
    describe_isa,
    environment,
    fbgemm_saturates,
    identity,
    int8_isa,
    native_isa,
    ort_avx2_launcher,
    quantized_engine,
)
from kdq.data import Normalize, load_test_split
from kdq.evaluate import median_ms
from kdq.files import save_json
from kdq.int8run import logits_in_child, ort_session
from kdq.quant import FLOAT_LAYERS, QUANTIZATION, float_reference, get_flow, int8_model, qat_float_forward
from kdq.stats import (
    FAIL,
    NOT_PROVEN,
    PASS,
    Paired,
    Result,
    classes_within,
    difference_within,
    drop_interval,
    drop_within,
    proportion_at_least,
    rate_interval,
    rate_within,
)

Runner = Callable[[np.ndarray], np.ndarray]
REFERENCE = "pytorch_int8"  # what the other int8 runtimes are compared with
FLOAT = "pytorch_fp32"  # the float model the int8 one came from (the model the int8 one replaces)
QAT_FLOAT = "pytorch_qat_fp32"  # the QAT model's own float forward, fake-quant off: int8 vs it = the arithmetic's cost
VERDICTS = {PASS: CERTIFIED, NOT_PROVEN: UNPROVEN, FAIL: REJECTED}  # the gates' verdicts -> the certificate's
FLOAT_CONVS = ("Conv", "FusedConv", "NhwcFusedConv")  # ORT op types of a convolution left in float
AGREEMENT_GATES = {"ort": "onnxruntime", "executorch": "executorch"}  # gate prefix -> runtime compared with PyTorch
ARTIFACT_NAMES = {"torchscript": "TorchScript", "pt2": "torch.export (.pt2)", "onnxruntime": "ONNX",
                  "executorch": "ExecuTorch"}  # fmt: skip
AGREEMENT_CHECKS = ("flip_rate_max", "confident_flip_rate_max", "mean_abs_logit_rel_max", "accuracy_delta_max")


def load_torchscript(path: Path):
    """torch.jit.load with a one-line ExportError for a file that is not TorchScript (call after verify_artifacts)."""
    try:
        return torch.jit.load(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise ExportError(f"{path}: not a loadable TorchScript model ({first})") from e


def load_onnx(path: Path, threads: int, config: dict | None = None):
    """An ONNX Runtime session, or a one-line ExportError for a file that is not ONNX (call after verify_artifacts)."""
    try:
        return ort_session(str(path), threads, config)
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:400]
        raise ExportError(f"{path}: not a valid ONNX model ({first})") from e


def torch_runner(model: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).float().numpy()

    return run


def ort_runner(session) -> Runner:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def ort_op_counts(path: Path, config: dict | None = None) -> dict[str, int]:
    """Op types of ORT's optimized graph and how often each occurs (QLinearConv, Conv, QLinearAdd, ...)."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        for key, value in (config or {}).items():
            opts.add_session_config_entry(key, str(value))
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def int8_kernels(counts: dict[str, int]) -> dict[str, int]:
    return {
        k: v for k, v in counts.items() if k.startswith("QLinear") or k in ("QGemm", "ConvInteger", "MatMulInteger")
    }


def count_convs(model: torch.nn.Module) -> int:
    """Convolutions of an int8 PyTorch model: eager modules (fused conv-relu counts once) or a PT2E graph."""
    if isinstance(model, torch.fx.GraphModule):
        return pt2e.count_convs(model)
    return sum(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in model.modules())


def batched(run: Runner, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def confident_margin(gates: dict, runtime: str) -> float:
    """The top-2 logit margin, in standard deviations of PyTorch int8's logits, above which a flip of `runtime`
    against PyTorch int8 counts as confident: its own gate's (for ONNX Runtime `ort_confident_margin`, for
    ExecuTorch `executorch_confident_margin`), else 0.5."""
    prefix = {rt: p for p, rt in AGREEMENT_GATES.items()}.get(runtime.partition("@")[0])
    return gates.get(f"{prefix}_confident_margin", 0.5)


def agreement(ref: np.ndarray, other: np.ndarray, margin: float) -> dict:
    """How `other`'s logits follow the reference's: top-1 flips (all, and where the reference's top-2 margin
    exceeds `margin` logit stds: a confident flip is no rounding tie), and logit differences."""
    top2 = np.sort(ref, axis=1)[:, -2:]
    scale = float(ref.std()) or 1.0
    confident = (top2[:, 1] - top2[:, 0]) > margin * scale
    flipped = ref.argmax(1) != other.argmax(1)
    diff = np.abs(ref - other)
    return {
        "n": len(ref),
        "flips": int(flipped.sum()),
        "top1_agreement": float(1 - flipped.mean()),
        "confident_samples": int(confident.sum()),
        "confident_flips": int((flipped & confident).sum()),
        "confident_margin": margin,  # in logit stds
        "confident_margin_logits": margin * scale,
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "mean_abs_logit_rel": float(diff.mean()) / scale,  # in units of the reference logits' std
        "identical": bool(np.array_equal(ref, other)),
    }


def paired_counts(correct: dict[str, np.ndarray], labels: np.ndarray, classes: int) -> dict[str, dict]:
    """The paired outcomes the accuracy gates test (`kdq.stats`), as "CANDIDATE vs REFERENCE": b (reference right,
    candidate wrong), c (the reverse), n, overall and per class. Every int8 run against the float model it
    replaces and against the QAT model's own float forward; every other int8 runtime against PyTorch int8."""
    pairs = [(k, ref) for ref in (FLOAT, QAT_FLOAT) if ref in correct for k in correct if "_int8" in k]
    pairs += [(k, REFERENCE) for k in correct if "_int8" in k and k != REFERENCE]

    def counts(ref_ok: np.ndarray, cand_ok: np.ndarray) -> dict:
        return vars(Paired.of(ref_ok, cand_ok)).copy()

    return {
        f"{cand} vs {ref}": {
            **counts(correct[ref], correct[cand]),
            "per_class": [counts(correct[ref][labels == c], correct[cand][labels == c]) for c in range(classes)],
        }
        for cand, ref in pairs
    }


def per_class_accuracy(logits: np.ndarray, labels: np.ndarray, classes: int) -> list[float]:
    pred = logits.argmax(1)
    return [float((pred[labels == c] == c).mean()) if (labels == c).any() else 1.0 for c in range(classes)]


# --- gates -----------------------------------------------------------------------------------------
# One small function per gate (optimum's staged validation): each reads its inputs from the report, and returns
# its records. `check_gates` runs every gate the target names; the registry and kdq.artifacts.GATES name the same.

Check = dict[str, Any]
Gate = Callable[[str, Any, dict], list[Check]]
_REGISTRY: dict[str, Gate] = {}
NO_FLOAT = (
    "the checkpoint records no float model to compare with: quantize a float checkpoint "
    "(`kdq quantize`, or `kdq distill --qat --init STUDENT`) to get one"
)


def gate(*names: str) -> Callable[[Gate], Gate]:
    """Register a gate function under the gate names it checks."""

    def register(fn: Gate) -> Gate:
        for name in names:
            _REGISTRY[name] = fn
        return fn

    return register


def record(name: str, value, threshold, passed, reason: str | None = None, stats: Result | None = None) -> Check:
    """A gate's record. A statistical gate (`stats`) also records its 95% interval, N, p-value, verdict (pass,
    not proven, fail: `kdq.stats`) and, when not proven, the test images that would prove it."""
    verdict = stats.verdict if stats else PASS if passed else FAIL
    out = {"name": name, "value": value, "threshold": threshold, "passed": verdict == PASS, "verdict": verdict,
           "reason": reason}  # fmt: skip
    if stats:
        out |= {"ci": list(stats.ci), "n": stats.n, "p": stats.p, "images_needed": stats.images_needed}
        if stats.mcnemar_p is not None:
            out["mcnemar_p"] = stats.mcnemar_p
    return out


def stat_record(name: str, result: Result, reason: str | None = None) -> Check:
    return record(name, result.value, result.bound, None, reason, result)


def check_gates(report: dict, gates: dict) -> list[Check]:
    """One record per gate the target names (per runtime for the accuracy gates): name, value, threshold,
    verdict, and the reason when its inputs are missing (then it fails: no gate is skipped)."""
    checks: list[Check] = []
    for name, threshold in gates.items():
        check = _REGISTRY.get(name)
        # load_target refuses unknown names; a hand-edited manifest must not pass silently either
        checks += check(name, threshold, report) if check else [record(name, None, threshold, False, "unknown gate")]
    for path, reason in report.get("missing_paths", {}).items():
        checks.append(record(f"path[{path}]", None, None, False, reason))
    return checks


def certificate_verdict(checks: list[Check]) -> str:
    """certified (every gate passed), rejected (some gate failed), or not proven (none failed, some could not be
    proven on this many test images)."""
    verdicts = {c["verdict"] for c in checks}
    return VERDICTS[FAIL if FAIL in verdicts else NOT_PROVEN if NOT_PROVEN in verdicts else PASS]


def int8_runtimes(report: dict) -> list[str]:
    return [k for k in report["accuracy"] if "_int8" in k]


def paired(report: dict, candidate: str, reference: str) -> Paired:
    counts = report["paired"][f"{candidate} vs {reference}"]
    return Paired(counts["b"], counts["c"], counts["n"])


def float_references(report: dict) -> list[tuple[str, str, str]]:
    """(overall record, per-class record, reference) of the int8-vs-float gates: against the float model the int8
    one replaces, and for a QAT model against its own float forward too (what int8 arithmetic alone costs)."""
    refs = [("int8_accuracy_drop", "class_drop", FLOAT), ("int8_arithmetic_drop", "class_arithmetic_drop", QAT_FLOAT)]
    return [ref for ref in refs if ref[2] in report["accuracy"]]


@gate("torchscript_identical", "pt2_identical")
def identical(name: str, required: bool, report: dict) -> list[Check]:
    """The saved program's int8 logits equal PyTorch int8's bit for bit."""
    artifact = name.partition("_")[0]
    same = report["agreement"].get(artifact)
    if same is None:
        return [record(name, None, 0.0, False, f"no {ARTIFACT_NAMES[artifact]} artifact in this export")]
    return [record(name, same["max_abs_logit_diff"], 0.0, same["identical"])]


@gate(*(f"{prefix}_confident_margin" for prefix in AGREEMENT_GATES))
def confident_margin_parameter(name: str, margin: float, report: dict) -> list[Check]:
    """Not a gate: the margin `{prefix}_confident_flip_rate_max` counts confident flips above."""
    return []


@gate(*(f"{prefix}_{check}" for prefix in AGREEMENT_GATES for check in AGREEMENT_CHECKS))
def runtime_agreement(name: str, threshold: float, report: dict) -> list[Check]:
    """ONNX Runtime or ExecuTorch int8 against PyTorch int8 on the same images: the rate of top-1 flips, the rate
    of confident flips (PyTorch's top-2 margin above the runtime's confident margin, in logit stds), the mean
    logit difference, and the accuracy difference (paired; exact McNemar p recorded)."""
    prefix, _, check = name.partition("_")
    runtime = AGREEMENT_GATES[prefix]
    a = report["agreement"].get(runtime)
    if a is None:
        return [record(name, None, threshold, False, f"no {ARTIFACT_NAMES[runtime]} artifact in this export")]
    if check == "flip_rate_max":
        return [stat_record(f"{prefix}_flip_rate", rate_within(a["flips"], a["n"], threshold))]
    if check == "confident_flip_rate_max":
        result = rate_within(a["confident_flips"], a["confident_samples"], threshold)
        margin = f"top-2 margin > {a['confident_margin']} logit stds ({a['confident_margin_logits']:.2f} logits)"
        reason = f"no image with a {margin}" if not a["confident_samples"] else margin
        return [stat_record(f"{prefix}_confident_flip_rate", result, reason)]
    if check == "mean_abs_logit_rel_max":
        rel = a["mean_abs_logit_rel"]
        return [record(f"{prefix}_mean_abs_logit_rel", rel, threshold, rel <= threshold)]
    result = difference_within(paired(report, f"{runtime}_int8", REFERENCE), threshold)
    return [stat_record(f"{prefix}_accuracy_delta", result)]


@gate("executorch_int8_delegated")
def executorch_delegated(name: str, required: bool, report: dict) -> list[Check]:
    """Every convolution in the XNNPACK delegate, and no quantize, dequantize, convolution or add outside it."""
    d = report.get("executorch_delegation")
    if not d:
        return [record(name, None, required, False, "no ExecuTorch artifact in this export")]
    outside = d["int8_ops_outside"]
    reason = f"outside the delegate: {outside}" if outside else None
    passed = d["delegated_convolutions"] == d["model_convs"] and not outside
    return [record(name, d["delegated_convolutions"], d["model_convs"], passed, reason)]


@gate("ort_int8_kernels")
def ort_int8_kernels(name: str, required: bool, report: dict) -> list[Check]:
    """Every int8 convolution of the model runs as a QLinearConv in ONNX Runtime's optimized graph, and exactly the
    layers a repair put in float (`quantization.float_layers`, kdq.repair) run as float convolutions."""
    k = report.get("ort_kernels")
    if not k:
        return [record(name, None, required, False, "no ONNX artifact in this export")]
    convs, expected = k["int8"].get("QLinearConv", 0), len(k.get("float_layers", []))
    reason = None
    if k["float_convs"] != expected:
        reason = f"{k['float_convs']} convolutions in float, {expected} expected"
    elif expected:
        reason = f"float by design: {', '.join(k['float_layers'])}"
    return [record(name, convs, k["model_convs"], convs == k["model_convs"] and k["float_convs"] == expected, reason)]


@gate("int8_accuracy_drop_max")
def int8_accuracy_drop(name: str, threshold: float, report: dict) -> list[Check]:
    """Every int8 runtime, on every path, loses at most `threshold` accuracy against the float model it replaces
    (and, for a QAT model, against its own float forward: the cost of the int8 arithmetic alone); proven by the
    95% interval of the paired drop."""
    refs = float_references(report)
    if not refs:
        return [record(name, None, threshold, False, NO_FLOAT)]
    return [stat_record(f"{prefix}[{rt}]", drop_within(paired(report, rt, ref), threshold))
            for prefix, _, ref in refs for rt in int8_runtimes(report)]  # fmt: skip


@gate("class_drop_max")
def class_drop(name: str, threshold: float, report: dict) -> list[Check]:
    """Every int8 runtime loses at most `threshold` on every class, against each float reference; Holm-corrected
    over the classes, so the threshold means the same at 36 images a class as at 1,000 (only the proof needs more)."""
    refs = float_references(report)
    if not refs:
        return [record(name, None, threshold, False, NO_FLOAT)]
    checks = []
    for _, prefix, ref in refs:
        for rt in int8_runtimes(report):
            per_class = [Paired(d["b"], d["c"], d["n"]) for d in report["paired"][f"{rt} vs {ref}"]["per_class"]]
            verdict, cls, holm_p = classes_within(per_class, threshold)
            worst = per_class[cls]
            lo, hi = drop_interval(worst)
            result = Result(worst.drop, (lo, hi), threshold, worst.n, holm_p[cls], verdict)
            reason = f"class {report['classes'][cls]!r} (Holm over {len(per_class)} classes)"
            checks.append(stat_record(f"{prefix}[{rt}]", result, reason))
    return checks


@gate("min_accuracy")
def min_accuracy(name: str, threshold: float, report: dict) -> list[Check]:
    """Every int8 runtime, on every path, reaches at least `threshold` accuracy (95% Wilson interval)."""
    n, acc = report["test_samples"], report["accuracy"]
    return [stat_record(f"min_accuracy[{rt}]", proportion_at_least(round(acc[rt] * n), n, threshold))
            for rt in int8_runtimes(report)]  # fmt: skip


def _ratio_pair(gate: str, batches: list[int]) -> tuple[tuple[str, str, int], tuple[str, str, int], str]:
    if gate == "ort_b1_max_ratio_vs_torchscript":
        return ("onnxruntime", "int8", 1), ("torchscript", "int8", 1), "ort_int8_b1_vs_torchscript_int8"
    big = max(batches)
    prefix = gate.partition("_")[0]
    runtime = AGREEMENT_GATES[prefix]
    return (runtime, "int8", big), (runtime, "fp32", big), f"{prefix}_int8_vs_fp32_b{big}"


@gate(*RATIO_GATES)
def latency_ratio(gate: str, spec, report: dict) -> list[Check]:
    """A latency ratio A/B: per thread count, the median over rounds of A/B measured in the same round.
    Passes when every thread count's ratio is at most max + margin (margin: what a busy machine may add)."""
    limit, margin = (spec["max"], spec.get("margin", 0.0)) if isinstance(spec, dict) else (spec, 0.0)
    rows = report["latency"]
    (a, b, name) = _ratio_pair(gate, [r["batch"] for r in rows] or [1])
    cells = {(r["runtime"], r["precision"], r["batch"], r["threads"]): r["rounds_ms"] for r in rows}
    threads = sorted({t for (*_, t) in cells})
    ratios = {}
    for t in threads:
        if (*a, t) in cells and (*b, t) in cells:
            ratios[t] = statistics.median(x / y for x, y in zip(cells[(*a, t)], cells[(*b, t)], strict=True))
    if not ratios:
        missing = "no fp32 reference (the checkpoint records no float model)" if b[1] == "fp32" else f"no {b[0]} run"
        return [record(name, None, limit, False, f"{missing} at batch {b[2]}")]
    worst = max(ratios, key=ratios.get)
    return [record(name, ratios[worst], f"{limit} + {margin}", ratios[worst] <= limit + margin,
                   f"worst at {worst} thread(s)" if len(ratios) > 1 else None)]  # fmt: skip


# --- measurement -----------------------------------------------------------------------------------


def measure(folder: Path, checkpoint: Path, data_dir: Path, reference: Path | None, latency_runs: int | None) -> dict:
    manifest = verify_artifacts(folder)
    source = manifest.get("source", {}).get("sha256")
    if source is not None and sha256(checkpoint) != source:
        raise ExportError(f"{checkpoint} is not the checkpoint {folder} was exported from (sha256 differs)")
    ckpt = ck.load_checkpoint(checkpoint)
    if ckpt[QUANTIZATION]["flow"] == "eager":  # its int8 modules run on the engine they were packed for
        torch.backends.quantized.engine = quantized_engine(ckpt[QUANTIZATION]["backend"])
    target = manifest["target"]
    gates, ort_config = target["gates"], target.get("onnxruntime_config", {})
    grid = dict(target["latency"])
    if latency_runs is not None:
        grid["runs"] = latency_runs
    preset = Preset.from_dict(ckpt[ck.PRESET])
    data = load_test_split(preset.dataset, data_dir, image_size=preset.image_size)
    x = Normalize(**ckpt[ck.NORMALIZATION])(data.test.images).contiguous().numpy()
    labels = data.test.labels.numpy()
    formats = manifest["artifacts"]
    onnx = folder / ARTIFACTS["onnx"] if "onnx" in formats else None

    int8 = int8_model(ckpt, checkpoint)
    runners: dict[tuple[str, str], Runner] = {("pytorch", "int8"): torch_runner(int8)}
    if "torchscript" in formats:
        runners[("torchscript", "int8")] = torch_runner(load_torchscript(folder / ARTIFACTS["torchscript"]))
    if "pt2" in formats:
        runners[("pt2", "int8")] = torch_runner(pt2e_export.load_pt2(folder / ARTIFACTS["pt2"]))
    if onnx:
        runners[("onnxruntime", "int8")] = ort_runner(load_onnx(onnx, 1, ort_config))
    if "executorch" in formats:
        runners[("executorch", "int8")] = pt2e_export.pte_runner(folder / ARTIFACTS["executorch"])
    fp32 = float_reference(ckpt)
    if fp32 is not None:
        runners[("pytorch", "fp32")] = torch_runner(fp32)
        for fmt, runtime, load in _FP32_REFERENCES:
            if reference is not None and (reference / ARTIFACTS[fmt]).is_file():
                runners[(runtime, "fp32")] = load(reference / ARTIFACTS[fmt])

    pytorch_int8 = get_flow(ckpt[QUANTIZATION]["flow"]).int8_kernels_in_pytorch
    paths = Int8Paths(checkpoint, onnx, ort_config, x)
    logits = {f"{r}_{p}": batched(run, x) for (r, p), run in runners.items()
              if (r, p) != ("onnxruntime", "int8") or not paths.ort_launcher}  # fmt: skip
    if onnx and paths.ort_launcher:  # KDQ_CPU=avx2 on a VNNI CPU: accuracy on the emulated AVX2 CPU
        logits["onnxruntime_int8"] = paths.ort_logits(ort_config, paths.ort_launcher)
    runs = paths.run(target.get("paths", []), logits, pytorch_int8)
    qat_fp32 = qat_float_forward(ckpt)
    if qat_fp32 is not None:
        logits[QAT_FLOAT] = batched(torch_runner(qat_fp32), x)
    ref = logits[REFERENCE]
    correct = {k: v.argmax(1) == labels for k, v in logits.items()}
    report: dict = {
        "test_samples": len(labels),
        "classes": data.classes,
        "accuracy": {k: float(ok.mean()) for k, ok in correct.items()},
        "paired": paired_counts(correct, labels, len(data.classes)),
        "per_class": {k: per_class_accuracy(v, labels, len(data.classes)) for k, v in logits.items()},
        "agreement": {
            k.replace("_int8", ""): agreement(ref, v, confident_margin(gates, k.replace("_int8", "")))
            for k, v in logits.items()
            if "_int8" in k and k != REFERENCE
        },  # fmt: skip
        "paths": paths.taken,
        "path_runs": runs,
        "missing_paths": paths.missing,
        "path_seconds": paths.seconds,
        "onnxruntime_config": ort_config,
        "sizes_bytes": {fmt: art["bytes"] for fmt, art in formats.items()},
    }
    if onnx:
        ops = ort_op_counts(onnx, ort_config)
        report["ort_kernels"] = {"int8": int8_kernels(ops), "model_convs": count_convs(int8),
                                 "float_convs": sum(ops.get(op, 0) for op in FLOAT_CONVS),
                                 "float_layers": list(ckpt[QUANTIZATION].get(FLOAT_LAYERS) or [])}  # fmt: skip
    if "executorch" in formats:  # recorded at lowering, in the sha256-checked manifest
        report["executorch_delegation"] = {**manifest["executorch"]["delegation"], "model_convs": count_convs(int8)}
    report["latency"] = _latency_grid(runners, folder, reference, grid, ort_config, ck.input_size(ckpt))
    report["speedup_int8_vs_fp32"] = _speedups(report["latency"])
    report["where"] = environment({"torch": torch.get_num_threads(), "latency_grid": grid.get("threads", [1])})
    report["checks"] = check_gates(report, gates)
    report["verdict"] = certificate_verdict(report["checks"])
    report["passed"] = report["verdict"] == VERDICTS[PASS]
    return report


_FP32_REFERENCES = (  # (format, runtime, loader) of the fp32 artifacts `kdq.export` writes for the speedups
    ("torchscript", "torchscript", lambda p: torch_runner(torch.jit.load(str(p)))),
    ("onnx", "onnxruntime", lambda p: ort_runner(ort_session(str(p), 1))),
    ("executorch", "executorch", pt2e_export.pte_runner),
)


class Int8Paths:
    """The int8 arithmetic paths of one certificate: the native one (this CPU's, or the one `KDQ_CPU` names) and
    the extra ones a target names ("avx2": the int16-saturating kernels of CPUs without VNNI; "exact": ONNX
    Runtime's non-saturating kernels). Records how each path was taken (`taken`), which logits computed it
    (`run`'s result, {path: {runtime: logits key}}), and the paths that could not be taken, with the reason."""

    def __init__(self, checkpoint: Path, onnx: Path | None, ort_config: dict, x: np.ndarray):
        self.checkpoint, self.onnx, self.ort_config, self.x = checkpoint, onnx, ort_config, x
        self.isa, self.native = int8_isa(), native_isa()
        self.missing: dict[str, str] = {}
        self.seconds: dict[str, float] = {}  # wall time of each extra path (an emulated one takes minutes)
        self.taken: dict[str, str] = {"native": describe_isa(self.isa)}
        if self.isa != self.native:
            self.taken["native"] += f" ({IDENTITY_ENV}={identity()} on a {describe_isa(self.native)} CPU)"
        self.ort_launcher: list[str] = []  # how this certificate runs ONNX Runtime's native path
        if onnx and self.isa["onnxruntime"] != self.native["onnxruntime"]:
            launcher, reason = ort_avx2_launcher()
            if launcher is None:
                raise ExportError(f"{IDENTITY_ENV}=avx2 cannot run ONNX Runtime's AVX2 kernels here: {reason}")
            self.ort_launcher = launcher
        if self.isa["pytorch"] != self.native["pytorch"] and not fbgemm_saturates():
            raise ExportError(
                f"{IDENTITY_ENV}=avx2 did not force PyTorch's AVX2 kernels (an int8 op ran before kdq was imported?): "
                f"set {FBGEMM_ISA_ENV}=AVX2 before starting Python"
            )

    def ort_logits(self, config: dict, launcher: list[str]) -> np.ndarray:
        """ONNX Runtime int8 logits with session `config`, in this process or under `launcher` (an emulator)."""
        if launcher:
            return logits_in_child("onnx", self.onnx, self.x, [f"{k}={v}" for k, v in config.items()],
                                   launcher=launcher)  # fmt: skip
        return batched(ort_runner(ort_session(str(self.onnx), 1, config)), self.x)

    def run(self, names: list[str], logits: dict, pytorch_int8: bool) -> dict[str, dict[str, str]]:
        """Add the logits of each extra path as `RUNTIME_int8@PATH`; return which logits computed each path.
        `pytorch_int8`: PyTorch runs real int8 kernels (`Flow.int8_kernels_in_pytorch`): it has an AVX2 path too."""
        runs = {"native": {k: k for k in logits if k.endswith("_int8")}}
        for name in names:
            start = time.perf_counter()
            self._run_path(name, logits, pytorch_int8, runs)
            self.seconds[name] = round(time.perf_counter() - start, 1)
        return runs

    def _run_path(self, name: str, logits: dict, pytorch_int8: bool, runs: dict) -> None:
        if name == "exact" and self.onnx:
            logits["onnxruntime_int8@exact"] = self.ort_logits({**self.ort_config, **ORT_EXACT_U8S8},
                                                               self.ort_launcher)  # fmt: skip
            runs[name] = {"onnxruntime_int8": "onnxruntime_int8@exact"}
            self.taken[name] = "ONNX Runtime with session.x64quantprecision=1 (u8u8, no int16 saturation)"
            if self.ort_launcher:
                self.taken[name] += " on the emulated AVX2 CPU"
        elif name == "avx2":
            runs[name], how = {}, []
            if pytorch_int8:
                runs[name]["pytorch_int8"], text = self._pytorch_avx2(logits)
                how.append(f"PyTorch: {text}")
            else:
                how.append("PyTorch: Q/DQ in float (no int8 kernel, no AVX2 path)")
            if self.onnx:
                key, text = self._ort_avx2(logits)
                if key:
                    runs[name]["onnxruntime_int8"] = key
                how.append(f"ONNX Runtime: {text}")
            self.taken[name] = "; ".join(how)

    def _pytorch_avx2(self, logits: dict) -> tuple[str, str]:
        if self.isa["pytorch"] == "avx2":
            return "pytorch_int8", "the native run (fbgemm's AVX2 kernels)"
        logits["pytorch_int8@avx2"] = logits_in_child("torch", self.checkpoint, self.x, ["fbgemm"], env=AVX2_ENV)
        return "pytorch_int8@avx2", f"fbgemm engine with {' '.join(f'{k}={v}' for k, v in AVX2_ENV.items())}"

    def _ort_avx2(self, logits: dict) -> tuple[str | None, str]:
        if self.isa["onnxruntime"] == "avx2":
            where = f", {self._emulated(self.ort_launcher)}" if self.ort_launcher else ""
            return "onnxruntime_int8", f"the native run{where}"
        launcher, reason = ort_avx2_launcher()
        if launcher is None:
            self.missing["avx2"] = reason
            return None, f"not run ({reason})"
        logits["onnxruntime_int8@avx2"] = self.ort_logits(self.ort_config, launcher)
        return "onnxruntime_int8@avx2", self._emulated(launcher)

    @staticmethod
    def _emulated(launcher: list[str]) -> str:
        return f"under `{' '.join(Path(c).name for c in launcher)}` (emulated AVX2 CPU, canary passed)"


def _latency_grid(
    runners: dict, folder: Path, reference: Path | None, grid: dict, ort_config: dict | None = None,
    image_size: int = 32,
):  # fmt: skip
    """Median ms of every runtime x batch x thread count, measured in `rounds` interleaved rounds: each round
    times every cell once, so a slow spell of the machine hits both sides of a ratio alike."""
    rounds = grid.get("rounds", 1)
    sessions: dict[tuple[str, int], Runner] = {}
    cells: dict[tuple, list[float]] = {}
    for _ in range(rounds):
        for threads in grid.get("threads", [1]):
            for (runtime, precision), run in runners.items():
                if runtime == "executorch" and threads != pt2e_export.executorch_threads():
                    continue  # its pool is sized once per process (pt2e_export.pte_runner): 1 thread
                if runtime == "onnxruntime":  # ORT threads are per session
                    base = folder if precision == "int8" else reference
                    config = ort_config if precision == "int8" else None
                    key = (precision, threads)
                    if key not in sessions:
                        sessions[key] = ort_runner(ort_session(str(base / ARTIFACTS["onnx"]), threads, config))
                    run = sessions[key]
                for batch in grid.get("batch_sizes", [1]):
                    total = grid.get("runs", 50) if batch == 1 else max(3, grid.get("runs", 50) // 5)
                    ms = latency_ms(run, batch, grid.get("warmup", 10) if batch == 1 else 2, max(3, total // rounds),
                                    lambda t=threads: torch.set_num_threads(t), image_size)  # fmt: skip
                    cells.setdefault((runtime, precision, batch, threads), []).append(ms)
    return [{"runtime": r, "precision": p, "batch": b, "threads": t, "ms": statistics.median(v), "rounds_ms": v}
            for (r, p, b, t), v in cells.items()]  # fmt: skip


def latency_ms(
    run: Runner, batch: int, warmup: int, runs: int, set_threads: Callable[[], None], image_size: int = 32
) -> float:
    set_threads()
    x = np.random.default_rng(0).standard_normal((batch, 3, image_size, image_size), dtype=np.float32)
    return median_ms(lambda: run(x), warmup, runs)


def _speedups(rows: list[dict]) -> dict:
    ms = {(r["runtime"], r["precision"], r["batch"], r["threads"]): r["ms"] for r in rows}
    return {f"{rt}_b{b}_t{t}": ms[(rt, "fp32", b, t)] / v
            for (rt, p, b, t), v in ms.items() if p == "int8" and (rt, "fp32", b, t) in ms}  # fmt: skip


# --- report ----------------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    """Markdown: where it was measured, accuracy per runtime and path, agreement, latency, then every gate."""
    lines = [f"# Parity certificate ({report['test_samples']} test images)", ""]
    if "where" in report:
        lines += [f"Measured on {describe(report['where'])}.", ""]
    for path, how in report.get("paths", {}).items():
        seconds = report.get("path_seconds", {}).get(path)
        lines.append(f"- int8 path `{path}`: {how}" + (f" ({seconds:.0f} s)" if seconds is not None else ""))
    if report.get("onnxruntime_config"):
        entries = ", ".join(f"{k}={v}" for k, v in report["onnxruntime_config"].items())
        lines.append(f"- ONNX Runtime session config (every consumer sets it, see the manifest): {entries}")
    lines += ["", "| runtime | accuracy | 95% CI (Wilson) | worst class vs float |", "|---|---|---|---|"]
    per_class, classes, n = report.get("per_class", {}), report.get("classes", []), report["test_samples"]
    for k, v in report["accuracy"].items():
        lo, hi = rate_interval(round(v * n), n)
        worst = ""
        if FLOAT in per_class and k != FLOAT and k in per_class:
            drops = np.subtract(per_class[FLOAT], per_class[k])
            worst = f"{classes[int(drops.argmax())]}: {-drops.max():+.1%}"
        lines.append(f"| {k} | {v:.2%} | {lo:.2%} – {hi:.2%} | {worst} |")
    lines += ["", "| vs PyTorch int8 | top-1 flips | confident flips | max abs Δlogit | mean abs Δlogit "
              "| mean abs Δlogit / std |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r, a in report["agreement"].items():
        lines.append(
            f"| {r} | {a['flips']} of {a['n']} ({1 - a['top1_agreement']:.2%}) | {a['confident_flips']} of "
            f"{a['confident_samples']} (margin > {a['confident_margin']} std) | {a['max_abs_logit_diff']:.4f} "
            f"| {a['mean_abs_logit_diff']:.4f} | {a['mean_abs_logit_rel']:.4f} |"
        )
    lines += ["", "| runtime | precision | batch | threads | median ms (of rounds) |", "|---|---|---|---|---|"]
    lines += [f"| {r['runtime']} | {r['precision']} | {r['batch']} | {r['threads']} | {r['ms']:.3f} |"
              for r in report["latency"]]  # fmt: skip
    if report.get("speedup_int8_vs_fp32"):
        lines += [
            "",
            "int8 vs fp32 speedup: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["speedup_int8_vs_fp32"].items()),
        ]
    kernels = report.get("ort_kernels")
    if kernels:
        listed = ", ".join(f"{k}×{v}" for k, v in kernels["int8"].items()) or "none"
        lines += ["", f"ONNX Runtime int8 kernels: {listed} ({kernels['model_convs']} convolutions in the model, "
                      f"{kernels['float_convs']} left in float)"]  # fmt: skip
    lines += ["", *format_gates(report["checks"]), "", f"**{certificate_headline(report)}**", ""]
    return "\n".join(lines)


SYMBOLS = {PASS: "✓", NOT_PROVEN: "? not proven", FAIL: "✗ FAILED"}


def format_gates(checks: list[Check]) -> list[str]:
    """The gate table: value, 95% interval, bound, N and p-value of every statistical gate (`kdq.stats`)."""
    lines = ["| gate | value | 95% CI | bound | N | p | | note |", "|---|---|---|---|---|---|---|---|"]
    for c in checks:
        value = "—" if c["value"] is None else f"{c['value']:.4g}"
        ci = f"[{c['ci'][0]:.4g}, {c['ci'][1]:.4g}]" if "ci" in c else ""
        n, p = (str(c["n"]), f"{c['p']:.2g}") if "n" in c else ("", "")
        note = c.get("reason") or ""
        if c.get("images_needed"):
            note = f"{note}; N ~{c['images_needed']:,} would prove it".lstrip("; ")
        lines.append(f"| {c['name']} | {value} | {ci} | {c['threshold']} | {n} | {p} | "
                     f"{SYMBOLS[c.get('verdict', PASS if c['passed'] else FAIL)]} | {note} |")  # fmt: skip
    return lines


def certificate_headline(report: dict) -> str:
    """One line: the verdict, and what a not-proven certificate would need."""
    verdict = report.get("verdict", VERDICTS[PASS] if report["passed"] else VERDICTS[FAIL])
    line = verdict.upper()
    if verdict == VERDICTS[NOT_PROVEN]:
        worst: dict[str, Check] = {}  # per gate, the record that needs the most images
        for c in report["checks"]:
            if c.get("verdict") == NOT_PROVEN:
                name = c["name"].split("[")[0]
                if name not in worst or (c.get("images_needed") or 0) > (worst[name].get("images_needed") or 0):
                    worst[name] = c
        parts = [f"{name} (N = {c['n']:,}" + (f"; ~{c['images_needed']:,} would prove it)" if c.get("images_needed")
                 else ")") for name, c in worst.items()]  # fmt: skip
        line += f": no gate failed, but {report['test_samples']:,} test images cannot prove " + ", ".join(parts)
    return line


@click.command()
@click.argument("folder", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--checkpoint", required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("data"))
@click.option("--reference", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder with fp32 model.pt / model.onnx for the speedup columns.")  # fmt: skip
@click.option("--latency-runs", type=int, default=None)
@click.option("--out", type=click.Path(path_type=Path), required=True)
def main(folder: Path, checkpoint: Path, data_dir: Path, reference: Path | None, latency_runs: int | None, out: Path):
    """Measure parity and latency of an export folder; write the JSON report."""
    from kdq.errors import KdqError

    try:
        report = measure(folder, checkpoint, data_dir, reference, latency_runs)
    except KdqError as e:
        raise click.ClickException(str(e).splitlines()[0]) from e
    save_json(report, out)
    print(format_report(report), file=sys.stderr)


if __name__ == "__main__":
    main()
