"""Eager vs PT2E, side by side, from the certificates of one run's exports (same float student, same test split).

    make bench-flows                                    # the three pipelines below, then this module
    uv run --frozen python -m bench.flows runs/demo     # bench/results/flows-demo-*.json (README: results/)

The run needs the three int8 students of the same float student and their certified exports:
    kdq pipeline --preset demo                                   # eager QAT -> export-x86
    kdq pipeline --preset demo --resume --target x86-pt2e        # PT2E QAT (x86)     -> export-x86-pt2e
    kdq pipeline --preset demo --resume --target mobile          # PT2E QAT (XNNPACK) -> export-mobile
Every number is read from an export's parity.json (measured by `kdq.parity` in a fresh process, on the whole
test split; latency: median of interleaved rounds, ms) and manifest.json (file sizes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import Table, environment, finish, print_table, write_results

EXPORTS = ("export-x86", "export-x86-pt2e", "export-mobile")
RUNTIMES = ("pytorch", "torchscript", "pt2", "onnxruntime", "executorch")


def measure(run_dir: Path, latency: bool = True) -> dict:
    """Each export's certificate; a rejected export (`EXPORT.rejected`) is reported with the gates it failed.
    Without `latency`, the latency cells are left out (measured on a busy machine, say)."""
    env = environment()
    rows = {}
    for name in EXPORTS:
        folder = run_dir / name
        if not (folder / "parity.json").is_file():
            folder = run_dir / f"{name}.rejected"
        if not (folder / "parity.json").is_file():
            continue
        parity = json.loads((folder / "parity.json").read_text())
        manifest = json.loads((folder / "manifest.json").read_text())
        cells = {(r["runtime"], r["precision"], r["batch"]): r["ms"] for r in parity["latency"] if r["threads"] == 1}
        rows[name] = {
            "flow": manifest["target"]["flow"] if "flow" in manifest["target"] else "eager",
            "backend": manifest["target"]["backend"],
            "stage": manifest["source"]["stage"],
            "passed": parity["passed"],
            "failed_gates": sorted({c["name"].split("[")[0] for c in parity["checks"] if not c["passed"]}),
            "accuracy": parity["accuracy"],
            "agreement": {k: v["top1_agreement"] for k, v in parity["agreement"].items()},
            "sizes_bytes": parity["sizes_bytes"],
            "latency_ms_t1": {f"{rt}_{p}_b{b}": ms for (rt, p, b), ms in cells.items()} if latency else {},
            "measured_on": parity["where"],
        }
    return {"run": str(run_dir), "exports": rows, "environment": finish(env)}


def tables(result: dict) -> list[Table]:
    exports = result["exports"]
    acc_rows, lat_rows = [], []
    for name, e in exports.items():
        int8 = {k: v for k, v in e["accuracy"].items() if k.endswith("_int8")}
        acc_rows.append([
            name, f"{e['flow']} / {e['backend']}", f"{e['accuracy'].get('pytorch_fp32', float('nan')):.2%}",
            ", ".join(f"{k.removesuffix('_int8')} {v:.2%}" for k, v in int8.items()),
            ", ".join(f"{k} {v:.2%}" for k, v in e["agreement"].items() if "@" not in k),
            ", ".join(f"{fmt} {b / 1e6:.2f}" for fmt, b in e["sizes_bytes"].items()),
            "passed" if e["passed"] else f"FAILED: {', '.join(e.get('failed_gates', []))}",
        ])  # fmt: skip
        for rt in RUNTIMES:
            cells = [e["latency_ms_t1"].get(f"{rt}_{p}_b{b}") for p in ("int8", "fp32") for b in (1, 64)]
            if any(c is not None for c in cells):
                lat_rows.append([name, rt, *("—" if c is None else f"{c:.2f}" for c in cells)])
    accuracy = Table("Eager vs PT2E: accuracy on the test split, agreement with PyTorch int8, file sizes (MB)",
                     ["export", "flow / backend", "float", "int8 per runtime", "top-1 agreement", "MB", "certificate"],
                     acc_rows)  # fmt: skip
    title = "Latency at 1 thread, ms (median of interleaved rounds; PyTorch runs a PT2E model as Q/DQ in float)"
    latency = Table(title, ["export", "runtime", "int8 b1", "int8 b64", "fp32 b1", "fp32 b64"], lat_rows)
    return [accuracy, latency] if lat_rows else [accuracy]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.flows", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--name", default=None, help="results file name  [default: flows-RUN]")
    parser.add_argument(
        "--no-latency",
        action="store_true",
        help="leave the certificates' latency out (they were measured while the machine was busy)",
    )
    args = parser.parse_args(argv)
    result = measure(args.run_dir, latency=not args.no_latency)
    if not result["exports"]:
        raise SystemExit(f"{args.run_dir}: none of {', '.join(EXPORTS)} has a parity.json")
    for table in tables(result):
        print_table(table)
    print(write_results(args.name or f"flows-{args.run_dir.name}", result))


if __name__ == "__main__":
    main()
