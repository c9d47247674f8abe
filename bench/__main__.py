"""`make bench` / `python -m bench`: the three benchmarks in one process, one results file.

    uv run --frozen python -m bench                    # all: training throughput, inference latency, floor
    uv run --frozen python -m bench --skip training    # only inference latency and the floor

Prints every table and writes bench/results/bench-<UTC time>.json (and bench-latest.json). Each benchmark
also runs alone: `python -m bench.training`, `python -m bench.inference`, `python -m bench.floor`.
Benchmarks are measurements, not tests: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import time

from bench import floor, inference, training
from bench.common import environment, finish, write_results

BENCHMARKS = ("training", "inference", "floor")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip", nargs="+", choices=BENCHMARKS, default=[], help="benchmarks to leave out")
    training.add_arguments(parser.add_argument_group("training throughput"))
    inference.add_arguments(parser.add_argument_group("inference latency"))
    args = parser.parse_args(argv)
    env = environment()
    results: dict = {"environment": env}
    seconds = {}
    t0 = time.perf_counter()
    if "training" not in args.skip:
        results["training"] = training.run(args)
        seconds["training"] = time.perf_counter() - t0
        training.show(results["training"])
    if "inference" not in args.skip:
        t = time.perf_counter()
        results["inference"] = inference.run(args)
        seconds["inference"] = time.perf_counter() - t
        inference.show(results["inference"])
    if "floor" not in args.skip:
        t = time.perf_counter()
        results["floor"] = floor.measure(results.get("inference"))
        seconds["floor"] = time.perf_counter() - t
        floor.show(results["floor"])
    env["seconds"] = {**seconds, "total": time.perf_counter() - t0}
    finish(env)
    load = f"load average {env['load_average_start']} -> {env['load_average_end']}"
    print(f"\n{load} (1, 5, 15 min; {env['cpu']['logical_cpus']} CPUs)")
    print(f"-> {write_results('bench', results)}  ({env['seconds']['total']:.0f} s)")


if __name__ == "__main__":
    main()
