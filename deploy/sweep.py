"""Fan `kdq sweep` out over a cluster through TorchX: prepare, then one job per candidate in parallel, then gather.

    python deploy/sweep.py -s local_cwd --preset smoke --budget-ms 0.3 --run-dir runs/sweep-smoke
    python deploy/sweep.py -s slurm -cfg time=60 --preset fashion-mnist-cpu --budget-ms 0.35 --run-dir $PWD/runs/sweep
    python deploy/sweep.py -s kubernetes --image REGISTRY/kdq:TAG --mount type=volume,src=kdq-runs,dst=/runs \\
        --run-dir /runs/sweep --budget-ms 0.35 --preset fashion-mnist-cpu

Every job is `components.py:sweep` (one `kdq sweep --step ...` process), submitted and awaited with TorchX's
runner, so the same three steps run on any scheduler TorchX knows. The prepare job plans and trains the teacher
once; each train job (`--index I`) distils, QAT-trains and certifies the I-th candidate within budget, all at
once; the gather job draws the front and chooses. When this machine sees the run directory (a shared file
system: Slurm), it starts exactly one job per candidate within budget; otherwise (a Kubernetes volume) one per
planned candidate, and those past the last within budget finish at once with nothing to do.

Plan where the model will run: the prepare job times the candidates on the node that runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from torchx.runner import get_runner
from torchx.specs import AppDef, AppState

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # components.py, at the repository root
import components  # noqa: E402


def jobs_to_train(run_dir: Path, planned: int) -> int:
    """The number of candidates within budget, when RUN/sweep/plan.json is visible here; else every planned one."""
    try:
        candidates = json.loads((run_dir / "sweep" / "plan.json").read_text())["candidates"]
    except (OSError, ValueError, KeyError):
        return planned
    return sum(c["within_budget"] for c in candidates)


def run_jobs(runner, apps: list[AppDef], scheduler: str, cfg: dict, what: str) -> None:
    """Submit every app at once, then wait for all; any that did not succeed stops the sweep."""
    handles = [runner.run(app, scheduler, cfg) for app in apps]
    for h in handles:
        print(f"[sweep] {what}: {h}", file=sys.stderr)
    failed = []
    for h in handles:
        status = runner.wait(h, wait_interval=2)
        if status is None or status.state != AppState.SUCCEEDED:
            failed.append(f"{h} ({status.state.name if status else 'unknown'})")
    if failed:
        raise SystemExit(f"deploy/sweep.py: {what} failed: {', '.join(failed)}; `torchx log HANDLE` shows why")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="deploy/sweep.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("-s", "--scheduler", default="local_cwd", help="a TorchX scheduler: local_cwd, slurm, ...")
    parser.add_argument("-cfg", "--scheduler-args", default="", help="scheduler options, e.g. time=60,partition=cpu")
    parser.add_argument("--budget-ms", type=float, required=True, help="int8 ms per image on the planning node")
    parser.add_argument("--run-dir", required=True, help="run directory as the jobs see it (shared by every job)")
    parser.add_argument("--local-run-dir", type=Path, default=None,
                        help="the same directory as this machine sees it  [default: --run-dir]")  # fmt: skip
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--recipe", default=None)
    parser.add_argument("--target", default="x86")
    parser.add_argument("--candidate", action="append", default=[], help="plan only these (repeat)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--latency-runs", type=int, default=None, help="certificates: timed runs per latency cell")
    parser.add_argument("--image", default=components.DEFAULT_IMAGE)
    parser.add_argument("--mount", action="append", default=None, help="container mounts (kubernetes, docker)")
    parser.add_argument("--cpu", type=int, default=2)
    parser.add_argument("--memMB", type=int, default=4096)
    args = parser.parse_args(argv)

    runner = get_runner()
    cfg = runner.scheduler_run_opts(args.scheduler).cfg_from_str(args.scheduler_args)
    common = dict(image=args.image, cpu=args.cpu, memMB=args.memMB, mounts=args.mount, preset=args.preset,
                  recipe=args.recipe, run_dir=args.run_dir, data_dir=args.data_dir, target=args.target,
                  device=args.device, latency_runs=args.latency_runs)  # fmt: skip
    prepare = components.sweep(step="prepare", budget_ms=args.budget_ms, candidates=args.candidate, **common)
    run_jobs(runner, [prepare], args.scheduler, cfg, "prepare")
    if args.candidate:
        planned = len(args.candidate)
    else:
        from kdq.plan import STUDENT_FAMILY

        planned = len(STUDENT_FAMILY)
    n = jobs_to_train(args.local_run_dir or Path(args.run_dir), planned)
    trains = [components.sweep(step="train", index=i, **common) for i in range(n)]
    run_jobs(runner, trains, args.scheduler, cfg, f"train ({n} candidates in parallel)")
    run_jobs(runner, [components.sweep(step="gather", **common)], args.scheduler, cfg, "gather")
    print(f"[sweep] done: {Path(args.run_dir) / 'sweep.json'}, {Path(args.run_dir) / 'report.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
