"""`kdq pipeline`: every stage of a run, in order, ending with the comparison table."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from kdq import recipes
from kdq.config import Preset


def run_pipeline(preset: Preset, run_dir: Path, opts: recipes.RunOptions) -> dict:
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    stages = {"teacher": recipes.train_teacher(preset, run_dir, opts)}
    stages["baseline"] = recipes.train_student(
        recipes.with_overrides(preset, alpha=0.0), run_dir, opts, stage="baseline"
    )
    stages["student"] = recipes.train_student(preset, run_dir, opts, stage="student")
    results = recipes.evaluate_checkpoints(list(stages.values()), opts, run_dir / recipes.EVALUATION_JSON)
    click.echo(recipes.format_table(results))
    print(f"[pipeline] {preset.name} done in {time.perf_counter() - t0:.0f}s -> {run_dir}", file=sys.stderr)
    return results
