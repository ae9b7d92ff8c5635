"""Output paths of the command line, checked before any work starts.

A command that writes files calls one of these first, so that a typo in a path costs a second
rather than the run (``attnkit train --out missing/dir/run.json`` used to fail only when writing,
after the training). The convention, the same for every command:

- an output **file** (``train --out``, ``viz --out`` / ``--png``): its directory must already exist
  and be writable; it is not created, because a misspelt directory would otherwise quietly grow a
  new tree (as shell redirection and ``open`` do). The file itself may exist (it is replaced) but
  must not be a directory.
- an output **directory** (``bench --out-dir``): created with its parents when missing (it is the
  command's own folder of results, as ``mkdir -p``), then checked writable.

Writable is proved, not inferred: a temporary file is created in the directory and removed again.
``os.access`` is not enough: for root it says yes to any directory, also to ``/proc`` or a folder on
a file system that refuses new files, where the write at the end would fail.

Both raise :class:`OutputPathError` (a ``ValueError``) naming the option, the path and what to do.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

__all__ = ["OutputPathError", "check_output_file", "prepare_output_dir"]


class OutputPathError(ValueError):
    """An output path that cannot be written; the message says which and what to do."""


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (``.`` at worst, for a relative path)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable_dir(directory: Path, option: str, path: Path) -> None:
    """Create and remove a temporary file in ``directory``: the only test that holds for root too."""
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".attnkit-write-check-"):
            pass  # removed on leaving the block
    except OSError as e:
        raise OutputPathError(f"{option} {str(path)!r}: the directory {str(directory)!r} is not writable "
                              f"(creating a file there failed: {e.strerror}); choose a path in a directory "
                              "you can write to") from e


def _check_writable_file(path: Path, option: str) -> None:
    """An existing regular file: open it for appending (writes nothing, keeps its contents)."""
    reason = None
    if not stat.S_ISREG(path.stat().st_mode):  # /dev/null, a fifo: opening one could block or act
        reason = None if os.access(path, os.W_OK) else "permission denied"
    else:
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND))
        except OSError as e:
            reason = e.strerror
    if reason is not None:
        raise OutputPathError(f"{option} {str(path)!r} exists and is not writable ({reason}); choose another "
                              "path or make it writable")


def check_output_file(path: str | os.PathLike, option: str) -> Path:
    """Check that the file ``path`` (given as ``option``) can be written, before the work; the Path.

    Raises:
        OutputPathError: ``path`` is a directory, its directory is missing or is not a directory,
            or the directory or an existing file there is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{option} {str(path)!r} is a directory; expected a file name, e.g. "
                              f"{str(path / 'out.json')!r}")
    parent = path.parent
    if not parent.exists():
        existing = _nearest_existing(parent)
        hint = (f"create it first (mkdir -p {parent}) or choose an existing directory" if existing.is_dir()
                else f"{str(existing)!r} is a file, not a directory; choose another path")
        raise OutputPathError(f"{option} {str(path)!r}: the directory {str(parent)!r} does not exist; {hint}")
    if not parent.is_dir():
        raise OutputPathError(f"{option} {str(path)!r}: {str(parent)!r} is a file, not a directory; "
                              "choose another path")
    _check_writable_dir(parent, option, path)
    if path.exists():
        _check_writable_file(path, option)
    return path


def prepare_output_dir(path: str | os.PathLike, option: str) -> Path:
    """Create the directory ``path`` (given as ``option``) with its parents if missing; the Path.

    Raises:
        OutputPathError: ``path`` or one of its parents is a file, it cannot be created, or it is
            not writable.
    """
    path = Path(path)
    existing = _nearest_existing(path)
    if not existing.is_dir():
        raise OutputPathError(f"{option} {str(path)!r}: {str(existing)!r} is a file, not a directory; "
                              "choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputPathError(f"{option} {str(path)!r}: cannot create the directory ({e.strerror}); "
                              "choose a path in a directory you can write to") from e
    _check_writable_dir(path, option, path)
    return path
