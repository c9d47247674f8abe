"""`kdq sweep` as a benchmark (`make bench-sweep`): Fashion-MNIST students for a latency budget on this CPU.

    uv run --frozen python -m bench.sweep                     # fashion-mnist-cpu recipe, budget 0.35 ms (~20 min)
    uv run --frozen python -m bench.sweep --budget-ms 0.5 --run-dir runs/sweep-0.5

The measurement is `kdq sweep`'s own (`kdq.sweep`): the candidates within budget distilled from one teacher under
the fashion-mnist-cpu recipe (3,000 training images), each certified on the 10,000 test images; the teacher in
float and int8; every exported ONNX file's accuracy and interleaved latency. This adds the environment record and
writes bench/results/sweep-<time>.json, whose committed copy results/sweep-fashion-mnist.json README's table is.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.common import Table, markdown_table, run_alone
from kdq.presets import get_preset
from kdq.recipes import RunOptions
from kdq.sweep import run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="fashion-mnist-cpu")
    parser.add_argument("--budget-ms", type=float, default=0.35, help="int8 ms at batch 1, 1 thread, on this CPU")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/sweep-fashion-mnist"))
    parser.add_argument("--target", default="x86", help="export target (name or .toml)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--candidate", action="append", default=[], help="plan only these (repeat)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per model per round")
    parser.add_argument("--latency-runs", type=int, default=None, help="certificates: timed runs per latency cell")
    parser.add_argument("--resume", action="store_true", help="keep what a stopped run finished")


def run(args: argparse.Namespace) -> dict:
    opts = RunOptions(data_dir=args.data_dir, device="cpu", resume=args.resume, tensorboard=False)
    return run_sweep(get_preset(args.preset), args.run_dir, opts, args.target, args.budget_ms, args.latency_runs,
                     rounds=args.rounds, runs=args.runs, names=args.candidate)  # fmt: skip


def tables(result: dict) -> list[str | Table]:
    """The front as README shows it: every model fastest first, the decision, and the paired comparisons."""
    rows = [[p["name"], p["verdict"], f"{p['top1']:.2%}", "{:.1%} – {:.1%}".format(*p["ci"]), f"{p['ms']:.3f}",
             "yes" if p["within_budget"] else "no", "yes" if p["name"] in result["front"] else "",
             "**recommended**" if p["name"] == result["recommended"] else ""]
            for p in sorted(result["points"], key=lambda p: p["ms"])]  # fmt: skip
    n = result["points"][0]["n"]
    title = (f"kdq sweep --preset {result['recipe']} --budget-ms {result['budget_ms']:g}: every exported model on "
             f"the {n:,} test images (95% Wilson interval), ONNX Runtime ms at batch {result['batch']}, "
             f"{result['threads']} thread(s), median of {result['rounds']} interleaved rounds")  # fmt: skip
    header = ["model", "certificate", "test top-1", "95% CI", "ms", "within budget", "on the front", ""]
    parts: list[str | Table] = [Table(title, header, rows), f"Decision: {result['decision']}."]
    for what, c in result.get("comparisons", {}).items():
        parts.append(f"Against the {what}: {c['sentence']}; {c['speedup']:.2f}× its speed.")
    return parts


def show(result: dict) -> None:
    for part in tables(result):
        print(part if isinstance(part, str) else markdown_table(part))


def main(argv: list[str] | None = None) -> None:
    run_alone("sweep", __doc__, add_arguments, run, show, argv)


if __name__ == "__main__":
    main()
