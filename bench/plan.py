"""`kdq plan` as a benchmark: every student candidate timed on this CPU, with the record README's table needs.

    uv run --frozen python -m bench.plan                      # x86, batch 1, 1 thread, budget 0.5 ms

The measurement is `kdq plan`'s own (`kdq.plan`: untrained candidates, int8 by PTQ, ONNX Runtime, the median of
interleaved rounds); this adds the environment record (CPU, versions, commit) and writes
bench/results/plan-<time>.json, whose committed copy results/plan-x86.json README's table comes from.
"""

from __future__ import annotations

import argparse

from bench.common import run_alone
from kdq import plan
from kdq.artifacts import load_target


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", default="x86")
    parser.add_argument("--budget-ms", type=float, default=0.5)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--runs", type=int, default=30, help="timed calls per model per round")


def run(args: argparse.Namespace) -> dict:
    target = load_target(args.target)
    return plan.run_plan(plan.STUDENT_FAMILY, target, args.budget_ms, batch=args.batch, threads=args.threads,
                         rounds=args.rounds, runs=args.runs, progress=print)  # fmt: skip


def show(result: dict) -> None:
    print(plan.format_table(result))


def main(argv: list[str] | None = None) -> None:
    run_alone("plan", __doc__, add_arguments, run, show, argv)


if __name__ == "__main__":
    main()
