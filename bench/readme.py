"""README's result tables, generated from the committed results files: no figure in README is typed by hand.

    uv run --frozen python -m bench.readme            # rewrite every generated block of README.md
    uv run --frozen python -m bench.readme --check    # exit 1 if a block differs from its JSON (tests run this)

A generated block sits between `<!-- bench.readme: NAME -->` and `<!-- /bench.readme -->`; NAME picks the
results file (under results/, copied unchanged from what a benchmark wrote) and how it is rendered. To update
README's numbers, rerun the benchmark, copy its JSON over the file below, and run this.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

from bench import accuracy, floor, flows, gpu_check, inference, int8_paths, memory, sweep, training
from bench.common import Table, markdown_table
from kdq.evaluate import paired_gain
from kdq.parity import certificate_headline
from kdq.stats import rate_interval

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCK = re.compile(r"(<!-- bench\.readme: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench\.readme -->)", re.S)


def measured_on(env: dict | None) -> str:
    """Where and with what a results file was measured, from its `environment` record (bench.common)."""
    if not env:
        return ""
    cpu, v = env["cpu"], env["versions"]
    simd = "VNNI" if "avx512_vnni" in cpu.get("simd_flags", []) else "AVX2, no VNNI"
    git = env.get("git") or {}
    commit = (git.get("commit") or "unknown")[:7] + (" with uncommitted changes" if git.get("dirty") else "")
    return (
        f" Measured {env['date'][:10]} on {cpu.get('model_name')} ({cpu['logical_cpus']} cores, {simd}), "
        f"torch {v['torch']}, ONNX Runtime {v['onnxruntime']}, Python {v['python']}, commit {commit}."
    )


def demo_tables(result: dict) -> list[str | Table]:
    """`make demo`'s evaluation: every model on the test images, then the KD student against the baseline on the
    same images (`kdq.evaluate.paired_gain`)."""
    rows = [[stage, r["arch"], f"{r['top1']:.2%}", f"{r['parameters'] / 1e6:.2f} M", f"{r['size_bytes'] / 1e6:.2f}",
             f"{r['latency_ms_b1']:.1f}", f"{r['throughput_img_s_b64']:,.0f}"]
            for stage, r in result.items()]  # fmt: skip
    n = len(next(iter(result.values())).get("correct", ""))
    table = Table(f"make demo: every model on the {n:,} test images", ["model", "arch", "test acc", "params",
                  "size MB", "PyTorch ms (b1)", "PyTorch img/s (b64)"], rows)  # fmt: skip
    gain = paired_gain(result)
    return [table] if gain is None else [table, f"Knowledge distillation: {gain.sentence()}."]


def certificate_tables(parity: dict) -> list[str | Table]:
    """The export certificate: its verdict, accuracy per runtime and path (95% intervals), agreement with PyTorch
    int8, and every gate with its interval, bound, N and verdict: what this many test images prove, and what not."""
    n = parity["test_samples"]
    accuracy = Table(f"Export certificate: top-1 on the {n} test images, per runtime (@path: the AVX2 and exact "
                     "int8 paths), with its 95% Wilson interval", ["runtime", "test acc", "95% CI"],
                     [[k, f"{v:.2%}", "{:.1%} – {:.1%}".format(*rate_interval(round(v * n), n))]
                      for k, v in parity["accuracy"].items()])  # fmt: skip
    agreement = Table(
        "Agreement with PyTorch int8",
        ["runtime", "top-1 agreement", "mean abs Δlogit", "… in logit stds", "max abs Δlogit"],
        [[k, f"{a['top1_agreement']:.2%}", f"{a['mean_abs_logit_diff']:.3f}", f"{a['mean_abs_logit_rel']:.3f}",
          f"{a['max_abs_logit_diff']:.3f}"] for k, a in parity["agreement"].items()],
    )  # fmt: skip
    gates = Table(
        "Gates: each statistical one is decided by its 95% interval against its bound (kdq/stats.py)",
        ["gate", "value", "95% CI", "bound", "N", "verdict"],
        [[c["name"], "—" if c["value"] is None else f"{c['value']:.4g}",
          "[{:.4g}, {:.4g}]".format(*c["ci"]) if "ci" in c else "", str(c["threshold"]), str(c.get("n", "")),
          c["verdict"] + (f" (~{c['images_needed']:,} images would prove it)" if c.get("images_needed") else "")]
         for c in parity["checks"]],
    )  # fmt: skip
    return [f"**Verdict: {certificate_headline(parity)}.**", accuracy, agreement, gates, latency_table(parity)]


def latency_table(parity: dict) -> Table:
    """The certificate's latency grid: each runtime's median ms, int8 and fp32, per batch size and thread count."""
    cells = {(c["runtime"], c["precision"], c["batch"], c["threads"]): c["ms"] for c in parity["latency"]}
    columns = sorted({(b, t) for _, _, b, t in cells})
    runtimes = dict.fromkeys((r, p) for r, p, _, _ in cells)  # in the certificate's order
    rows = [[r, p, *(f"{ms:.2f}" if (ms := cells.get((r, p, b, t))) is not None else "—" for b, t in columns)]
            for r, p in runtimes]  # fmt: skip
    rounds = len(parity["latency"][0].get("rounds_ms", [])) if parity["latency"] else 0
    title = f"Latency of the exported model, ms: the median of {rounds} interleaved rounds (the certificate's timing)"
    return Table(title, ["runtime", "precision", *(f"b{b} {t}T" for b, t in columns)], rows)


def plan_tables(result: dict) -> list[str | Table]:
    """`kdq plan`'s JSON: every candidate's int8 and fp32 latency in the target's runtime, fastest first."""
    rows = [[r["name"], f"{r['parameters'] / 1e6:.2f} M", f"{r['macs'] / 1e6:.1f}", f"{r['int8_ms']:.3f}",
             f"{r['fp32_ms']:.3f}", f"{r['fp32_ms'] / r['int8_ms']:.2f}×", "yes" if r["within_budget"] else "no"]
            for r in result["candidates"]]  # fmt: skip
    title = (
        f"kdq plan --target {result['target']} --budget-ms {result['budget_ms']:g}: ONNX Runtime, batch "
        f"{result['batch']}, {result['threads']} thread(s), median of {result['rounds']} interleaved rounds"
    )
    header = ["candidate", "params", "M MACs", "int8 ms", "fp32 ms", "int8 speed-up", "within budget"]
    return [Table(title, header, rows)]


def bench_parts(result: dict) -> list[str | Table]:
    """`python -m bench`'s file: the floor's derivation, inference latency (with the floor), training throughput."""
    return [floor.summary(result["floor"]), *inference.tables(result["inference"]), *floor.tables(result["floor"]),
            *training.tables(result["training"])]  # fmt: skip


# block name -> (its results file, the parts of the block drawn from it: tables, or sentences)
SOURCES: dict[str, tuple[str, Callable[[dict], list[str | Table]]]] = {
    "demo": ("results/demo/evaluation_results.json", demo_tables),
    "demo-certificate": ("results/demo/parity.json", certificate_tables),
    "fashion-mnist": ("results/accuracy-fashion-mnist.json", accuracy.readme_parts),
    "accuracy-demo": ("results/accuracy-demo.json", accuracy.readme_parts),
    "int8-paths": ("results/int8_paths.json", int8_paths.tables),
    "bench": ("results/bench.json", bench_parts),
    "flows": ("results/flows-demo.json", flows.tables),
    "flows-fashion-mnist": ("results/flows-fashion-mnist.json", flows.tables),
    "memory": ("results/memory-fashion-mnist.json", memory.tables),
    "plan": ("results/plan-x86.json", plan_tables),
    "sweep": ("results/sweep-fashion-mnist.json", sweep.tables),
    "gpu-check": ("results/gpu-check-h200.json", gpu_check.tables),
    "gpu-check-full": ("results/gpu-check-h200-full.json", gpu_check.tables),
}


def render(name: str, result: dict) -> str:
    source, make_parts = SOURCES[name]
    intro = (
        f"_Generated by `python -m bench.readme` from [{source}]({source}).{measured_on(result.get('environment'))}_"
    )
    parts = [intro, *(p if isinstance(p, str) else markdown_table(p) for p in make_parts(result))]
    return "\n\n".join(parts) + "\n"


def regenerate(text: str, root: Path = ROOT) -> str:
    """`text` with every generated block re-rendered from its results file."""

    def block(m: re.Match) -> str:
        name = m["name"]
        if name not in SOURCES:
            raise KeyError(f"README block {name!r} has no results file; known: {', '.join(SOURCES)}")
        result = json.loads((root / SOURCES[name][0]).read_text())
        return f"{m.group(1)}{render(name, result)}{m.group(4)}"

    return BLOCK.sub(block, text)


def stale_blocks(readme: Path = README) -> list[str]:
    text = readme.read_text()
    new = regenerate(text)
    old_blocks = {m["name"]: m["body"] for m in BLOCK.finditer(text)}
    return [m["name"] for m in BLOCK.finditer(new) if old_blocks.get(m["name"]) != m["body"]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.readme", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ; exit 1 if any")
    args = parser.parse_args(argv)
    stale = stale_blocks()
    if args.check:
        if stale:
            sys.exit(f"README.md: generated blocks differ from their results files: {', '.join(stale)}; "
                     "run `python -m bench.readme`")  # fmt: skip
        print("README.md: every generated block matches its results file")
        return
    README.write_text(regenerate(README.read_text()))
    print(f"README.md: {len(stale)} block(s) rewritten{': ' + ', '.join(stale) if stale else ''}")


if __name__ == "__main__":
    main()
