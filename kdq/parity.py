"""Parity certificate of an export folder, run in a fresh process: `python -m kdq.parity EXPORT_DIR ...`.

Loads every artifact independently (after checking its sha256 against the manifest), runs the whole
test split through PyTorch int8 (the reference), TorchScript and ONNX Runtime, measures CPU latency of
each runtime in fp32 and int8 on one grid in this one process, and checks the target's gates. Writes
parity.json; `format_report` renders it as a Markdown table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import torch

from kdq import checkpoint as ck
from kdq.config import Preset
from kdq.data import Normalize, load_dataset
from kdq.evaluate import median_ms
from kdq.files import save_json
from kdq.quant import QUANTIZATION, float_reference, int8_model

Runner = Callable[[np.ndarray], np.ndarray]


def verify_artifacts(folder: Path) -> dict:
    """The manifest, after checking that every artifact it lists has the recorded sha256.

    Nothing in the folder is loaded before this passes; a failure is a one-line ExportError.
    """
    from kdq.export import MANIFEST, ExportError, sha256

    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} not found: {folder} is not a kdq export folder")
    try:
        manifest = json.loads(path.read_text())
        artifacts = manifest["artifacts"]
        files = {fmt: (art["file"], art["sha256"]) for fmt, art in artifacts.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ExportError(f"{path}: not a kdq export manifest ({e.__class__.__name__})") from e
    for name, expected in files.values():
        if not isinstance(name, str) or Path(name).name != name:  # only plain names: never a path out of the folder
            raise ExportError(f"{path}: artifact name {name!r} is not a plain file name")
        if not (folder / name).is_file():
            raise ExportError(f"{folder / name} is missing (the manifest lists it)")
        actual = sha256(folder / name)
        if actual != expected:
            raise ExportError(
                f"{folder / name}: sha256 {actual[:12]}… does not match the manifest ({str(expected)[:12]}…); "
                "refusing to load it"
            )
    return manifest


def load_torchscript(path: Path):
    """torch.jit.load with a one-line ExportError for a file that is not TorchScript (call after verify_artifacts)."""
    from kdq.export import ExportError

    try:
        return torch.jit.load(str(path))
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:160]
        raise ExportError(f"{path}: not a loadable TorchScript model ({first})") from e


def load_onnx(path: Path, threads: int):
    """An ONNX Runtime session, or a one-line ExportError for a file that is not ONNX (call after verify_artifacts)."""
    from kdq.export import ExportError

    try:
        return ort_session(path, threads)
    except Exception as e:
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:400]
        raise ExportError(f"{path}: not a valid ONNX model ({first})") from e


def torch_runner(model: Callable[[torch.Tensor], torch.Tensor]) -> Runner:
    @torch.no_grad()
    def run(x: np.ndarray) -> np.ndarray:
        return model(torch.from_numpy(x)).float().numpy()

    return run


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(session) -> Runner:
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def ort_int8_kernels(path: Path) -> dict[str, int]:
    """Op types of ORT's optimized graph that compute in int8 (QLinearConv, QLinearAdd, ...)."""
    import onnx
    import onnxruntime as ort

    with __import__("tempfile").TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        graph = onnx.load(opts.optimized_model_filepath).graph
    counts: dict[str, int] = {}
    for node in graph.node:
        if node.op_type.startswith("QLinear") or node.op_type in ("QGemm", "ConvInteger", "MatMulInteger"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def batched(run: Runner, x: np.ndarray, batch: int = 256) -> np.ndarray:
    return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])


def agreement(ref: np.ndarray, other: np.ndarray, margin: float) -> dict:
    top2 = np.sort(ref, axis=1)[:, -2:]
    confident = (top2[:, 1] - top2[:, 0]) > margin
    same = ref.argmax(1) == other.argmax(1)
    diff = np.abs(ref - other)
    return {
        "top1_agreement": float(same.mean()),
        "confident_agreement": float(same[confident].mean()) if confident.any() else 1.0,
        "confident_samples": int(confident.sum()),
        "max_abs_logit_diff": float(diff.max()),
        "mean_abs_logit_diff": float(diff.mean()),
        "identical": bool(np.array_equal(ref, other)),
    }


def latency_ms(run: Runner, batch: int, warmup: int, runs: int, set_threads: Callable[[], None]) -> float:
    set_threads()
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32), dtype=np.float32)
    return median_ms(lambda: run(x), warmup, runs)


def check_gates(report: dict, gates: dict) -> list[dict]:
    """One record per gate: name, measured value, threshold, passed."""
    checks = []

    def add(name, value, threshold, passed):
        checks.append({"name": name, "value": value, "threshold": threshold, "passed": bool(passed)})

    ts, ort = report["agreement"].get("torchscript"), report["agreement"].get("onnxruntime")
    acc = report["accuracy"]
    if gates.get("torchscript_identical") and ts is not None:
        add("torchscript_identical", ts["max_abs_logit_diff"], 0.0, ts["identical"])
    if ort is not None:
        if "ort_top1_agreement_min" in gates:
            t = gates["ort_top1_agreement_min"]
            add("ort_top1_agreement", ort["top1_agreement"], t, ort["top1_agreement"] >= t)
        if "ort_confident_margin" in gates:
            add("ort_confident_agreement", ort["confident_agreement"], 1.0, ort["confident_agreement"] == 1.0)
        if "ort_mean_abs_logit_max" in gates:
            t = gates["ort_mean_abs_logit_max"]
            add("ort_mean_abs_logit_diff", ort["mean_abs_logit_diff"], t, ort["mean_abs_logit_diff"] <= t)
        if "ort_accuracy_delta_max" in gates:
            d, t = abs(acc["onnxruntime_int8"] - acc["pytorch_int8"]), gates["ort_accuracy_delta_max"]
            add("ort_accuracy_delta", d, t, d <= t)
        add("ort_int8_kernels", sum(report["ort_int8_kernels"].values()), 1, sum(report["ort_int8_kernels"].values()))
    lat = {(r["runtime"], r["precision"], r["batch"], r["threads"]): r["ms"] for r in report["latency"]}

    def best(runtime, precision, batch):
        values = [v for (r, p, b, _), v in lat.items() if (r, p, b) == (runtime, precision, batch)]
        return min(values) if values else None

    if "ort_b1_max_ratio_vs_torchscript" in gates and best("torchscript", "int8", 1):
        ratio, t = (
            best("onnxruntime", "int8", 1) / best("torchscript", "int8", 1),
            gates["ort_b1_max_ratio_vs_torchscript"],
        )
        add("ort_int8_b1_vs_torchscript_int8", ratio, t, ratio <= t)
    big = max(b for (_, _, b, _) in lat) if lat else None
    if "ort_int8_max_ratio_vs_fp32" in gates and big and best("onnxruntime", "fp32", big):
        ratio, t = (
            best("onnxruntime", "int8", big) / best("onnxruntime", "fp32", big),
            gates["ort_int8_max_ratio_vs_fp32"],
        )
        add(f"ort_int8_vs_fp32_b{big}", ratio, t, ratio <= t)
    return checks


def measure(folder: Path, checkpoint: Path, data_dir: Path, reference: Path | None, latency_runs: int | None) -> dict:
    from kdq.export import ARTIFACTS, ExportError, sha256

    manifest = verify_artifacts(folder)
    source = manifest.get("source", {}).get("sha256")
    if source is not None and sha256(checkpoint) != source:
        raise ExportError(f"{checkpoint} is not the checkpoint {folder} was exported from (sha256 differs)")
    ckpt = ck.load_checkpoint(checkpoint)
    torch.backends.quantized.engine = ckpt[QUANTIZATION]["backend"]
    target = manifest["target"]
    gates = target["gates"]
    grid = dict(target["latency"])
    if latency_runs is not None:
        grid["runs"] = latency_runs
    data = load_dataset(Preset.from_dict(ckpt[ck.PRESET]).dataset, data_dir)
    x = Normalize(**ckpt[ck.NORMALIZATION])(data.test.images).contiguous().numpy()
    labels = data.test.labels.numpy()

    runners: dict[tuple[str, str], Runner] = {("pytorch", "int8"): torch_runner(int8_model(ckpt, checkpoint))}
    formats = manifest["artifacts"]
    if "torchscript" in formats:
        runners[("torchscript", "int8")] = torch_runner(load_torchscript(folder / ARTIFACTS["torchscript"]))
    if "onnx" in formats:
        runners[("onnxruntime", "int8")] = ort_runner(load_onnx(folder / ARTIFACTS["onnx"], 1))
    fp32 = float_reference(ckpt)
    if fp32 is not None:
        runners[("pytorch", "fp32")] = torch_runner(fp32)
        if reference is not None:
            runners[("torchscript", "fp32")] = torch_runner(torch.jit.load(str(reference / ARTIFACTS["torchscript"])))
            runners[("onnxruntime", "fp32")] = ort_runner(ort_session(reference / ARTIFACTS["onnx"], 1))

    logits = {key: batched(run, x) for key, run in runners.items()}
    ref = logits[("pytorch", "int8")]
    report: dict = {
        "test_samples": len(labels),
        "accuracy": {f"{r}_{p}": float((v.argmax(1) == labels).mean()) for (r, p), v in logits.items()},
        "agreement": {
            r: agreement(ref, logits[(r, "int8")], gates.get("ort_confident_margin", 1.0))
            for r in ("torchscript", "onnxruntime")
            if (r, "int8") in logits
        },  # fmt: skip
        "ort_int8_kernels": ort_int8_kernels(folder / ARTIFACTS["onnx"]) if "onnx" in formats else {},
        "sizes_bytes": {fmt: art["bytes"] for fmt, art in formats.items()},
        "latency": [],
    }
    report["latency"] = _latency_grid(runners, folder, reference, grid)
    report["speedup_int8_vs_fp32"] = _speedups(report["latency"])
    report["checks"] = check_gates(report, gates)
    report["passed"] = all(c["passed"] for c in report["checks"])
    return report


def _latency_grid(runners: dict, folder: Path, reference: Path | None, grid: dict) -> list[dict]:
    from kdq.export import ARTIFACTS

    rows = []
    for threads in grid.get("threads", [1]):
        for (runtime, precision), run in runners.items():
            if runtime == "onnxruntime":  # ORT threads are per session
                base = folder if precision == "int8" else reference
                run = ort_runner(ort_session(base / ARTIFACTS["onnx"], threads))
            for batch in grid.get("batch_sizes", [1]):
                runs = grid.get("runs", 50) if batch == 1 else max(3, grid.get("runs", 50) // 5)
                ms = latency_ms(run, batch, grid.get("warmup", 10) if batch == 1 else 2, runs,
                                lambda t=threads: torch.set_num_threads(t))  # fmt: skip
                rows.append({"runtime": runtime, "precision": precision, "batch": batch, "threads": threads, "ms": ms})
    return rows


def _speedups(rows: list[dict]) -> dict:
    ms = {(r["runtime"], r["precision"], r["batch"], r["threads"]): r["ms"] for r in rows}
    return {f"{rt}_b{b}_t{t}": ms[(rt, "fp32", b, t)] / v
            for (rt, p, b, t), v in ms.items() if p == "int8" and (rt, "fp32", b, t) in ms}  # fmt: skip


def format_report(report: dict) -> str:
    """Markdown: accuracy per runtime, agreement, latency grid, then the gates with ✓/✗."""
    lines = [f"# Parity certificate ({report['test_samples']} test images)", "", "| runtime | accuracy |", "|---|---|"]
    lines += [f"| {k} | {v:.2%} |" for k, v in report["accuracy"].items()]
    lines += ["", "| vs PyTorch int8 | top-1 agreement | confident agreement | max abs Δlogit | mean abs Δlogit |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r, a in report["agreement"].items():
        lines.append(
            f"| {r} | {a['top1_agreement']:.2%} | {a['confident_agreement']:.2%} ({a['confident_samples']}) "
            f"| {a['max_abs_logit_diff']:.4f} | {a['mean_abs_logit_diff']:.4f} |"
        )
    lines += ["", "| runtime | precision | batch | threads | median ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['runtime']} | {r['precision']} | {r['batch']} | {r['threads']} | {r['ms']:.3f} |"
              for r in report["latency"]]  # fmt: skip
    if report.get("speedup_int8_vs_fp32"):
        lines += [
            "",
            "int8 vs fp32 speedup: " + ", ".join(f"{k} {v:.2f}x" for k, v in report["speedup_int8_vs_fp32"].items()),
        ]
    kernels = report.get("ort_int8_kernels") or {}
    lines += ["", "ONNX Runtime int8 kernels: " + (", ".join(f"{k}×{v}" for k, v in kernels.items()) or "none")]
    lines += ["", "| gate | value | threshold | |", "|---|---|---|---|"]
    lines += [f"| {c['name']} | {c['value']:.4g} | {c['threshold']} | {'✓' if c['passed'] else '✗ FAILED'} |"
              for c in report["checks"]]  # fmt: skip
    lines += ["", f"**{'PASSED' if report['passed'] else 'FAILED'}**", ""]
    return "\n".join(lines)


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
