"""Crash-safe file output: every file kdq writes appears whole or not at all."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kdq.errors import KdqError


class OutputError(KdqError):
    """An output cannot be written (folder not writable, disk full, a file in the way)."""


def _why(e: OSError) -> str:
    return e.strerror or e.__class__.__name__


def check_writable(folder: Path | str, create: bool = True) -> None:
    """Create `folder` if needed and prove a file can be written there, before any long work starts.

    With `create=False` nothing is left behind: the probe file goes to the nearest folder that exists
    (for checks made before the options are validated, so that a bad option leaves no empty folder).
    """
    folder = Path(folder)
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        probe_in = folder if create else next(p for p in (folder, *folder.parents) if p.exists())
        fd, tmp = tempfile.mkstemp(dir=probe_in, prefix=".kdq-write-test-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"output folder {folder} is not writable ({_why(e)}); choose another --run-dir/--out") from e


def remove_stale_temps(path: Path | str) -> list[Path]:
    """Delete the temporary files a killed writer of `path` left behind (`.NAME.*.tmp`); returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(f".{path.name}.*.tmp"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


@contextmanager
def atomic_output(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync it and rename it over `path`.

    A kill at any moment leaves either the old file or the new one, never a torn one (rename is
    atomic within a filesystem; the folder is fsynced too, so the rename survives a power cut). On error
    the temporary file is removed; an OSError (not writable, disk full) becomes a one-line OutputError.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {_why(e)}") from e
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600: give the file the mode open() would have
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp_path.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {_why(e)}") from e
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows): the rename itself is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_torch(obj: Any, path: Path | str) -> None:
    with atomic_output(path) as tmp:
        torch.save(obj, tmp)


def save_json(obj: Any, path: Path | str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def save_text(text: str, path: Path | str) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(text)


def save_png(fig, path: Path) -> Path:
    """A matplotlib figure as PNG, written atomically."""
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def newer_than(output: Path, inputs: Iterable[Path]) -> bool:
    """Make's rule: `output` exists and no input changed after it was written."""
    return output.exists() and all(Path(i).stat().st_mtime <= output.stat().st_mtime for i in inputs)
