"""Progress of the long commands: a tqdm bar on a terminal, short lines (not one giant line) in a log."""

from __future__ import annotations

import fcntl
import io
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

import attnkit
from attnkit.cli import _progress
from attnkit.cli._progress import progress_bar

MAX_LINE = 200  # characters: a log line a person can read


def _lines(text: str) -> list[str]:
    """The lines of a log as a file viewer shows them: split at "\n" only (str.splitlines splits at "\r")."""
    return text.removesuffix("\n").split("\n")


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    src = str(Path(attnkit.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    return env


def _train(out: Path) -> list[str]:
    """A quick run that evaluates (and updates its bar) at every step: the old bar's 13 redraws made one
    line of 13 x ~50 characters."""
    return ["train", "--length", "6", "--num-symbols", "4", "--embed-dim", "16", "--layers", "1", "--steps", "12",
            "--eval-every", "1", "--out", str(out / "train.json")]


def _train_runs(out: Path) -> list[tuple[str, str]]:
    runs = json.loads((out / "train.json").read_text())["runs"]
    return [(f"{r['variant']:<5} seed {r['seed']}", f"{r['steps']}/12") for r in runs]


def _bench(out: Path) -> list[str]:
    return ["bench", "--ns", "64", "--impls", "tiled,sdpa", "--masks", "causal", "--modes", "fwd", "--reps", "1",
            "--out-dir", str(out)]


def _bench_runs(out: Path) -> list[tuple[str, str]]:
    (json_path,) = out.glob("cpu_*.json")
    rows = json.loads(json_path.read_text())["rows"]
    return [("bench", f"{len(rows)}/{len(rows)}")]


# argv builder, reader of the finished bars: (label, its last count "n/total")
COMMANDS = {"train": (_train, _train_runs), "bench": (_bench, _bench_runs)}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_progress_written_to_a_log_file_is_a_few_short_lines(command, tmp_path):
    argv, read_runs = COMMANDS[command]
    log = tmp_path / "stderr.log"
    t0 = time.perf_counter()
    with open(log, "w") as err:  # a file, not a terminal: what `attnkit train 2> log` gives
        proc = subprocess.run([sys.executable, "-m", "attnkit.cli.main", *argv(tmp_path)], stderr=err,
                              stdout=subprocess.PIPE, text=True, env=_child_env(), timeout=600)
    seconds = time.perf_counter() - t0
    text = log.read_bytes().decode()  # as written: read_text() would turn each "\r" into a line break
    assert proc.returncode == 0, text[-2000:]
    lines = _lines(text)
    assert "\r" not in text and max(map(len, lines)) <= MAX_LINE, [len(line) for line in lines]
    bars = read_runs(tmp_path)
    # per bar its first and last line (+1 for rounding), and at most one more per LOG_INTERVAL_S
    assert len(lines) <= 3 * len(bars) + seconds // _progress.LOG_INTERVAL_S, text
    for label, last_count in bars:  # the log still says how far each run got
        assert any(line.startswith(label) and last_count in line for line in lines), (label, last_count, text)


def test_log_lines_are_bounded_and_the_last_state_is_written_once(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(_progress, "LOG_INTERVAL_S", 0.0)  # every update would be a line
    bar = progress_bar("a label that is rather long " * 3, 400, unit="step", stream=log)
    for step in range(1, 401):
        bar.set_postfix_str(f"loss {1 / step:.4f} and a long note " * 4, refresh=False)
        bar.update(1)
    bar.close()
    lines = _lines(log.getvalue())
    assert len(lines) == 401 and "\r" not in log.getvalue()  # 0, 1, ..., 400: once each, the last too
    assert max(map(len, lines)) <= _progress.LOG_WIDTH and "400/400" in lines[-1]


def test_log_lines_come_at_most_every_interval():
    log = io.StringIO()
    with progress_bar("quick", 10_000, stream=log) as bar:  # far shorter than LOG_INTERVAL_S
        for _ in range(10_000):
            bar.update(1)
    lines = _lines(log.getvalue())
    assert len(lines) == 2 and "0/10000" in lines[0] and "10000/10000" in lines[1], lines


def _read_all(fd: int) -> str:
    """Everything written to a pty so far: one os.read returns only what one chunk holds (under
    load the bar's redraws arrived in several, and a single read saw only the first)."""
    import select
    chunks = []
    while select.select([fd], [], [], 0.5)[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_a_terminal_gets_the_bar_redrawn_in_place():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # 24 rows, 100 columns
    try:
        with open(follower, "w", closefd=False) as tty:
            with progress_bar("live", 3, stream=tty) as bar:
                for _ in range(3):
                    bar.update(1)
            tty.flush()
        shown = _read_all(leader)
    finally:
        os.close(leader)
        os.close(follower)
    # redrawn in place ("\r" + line; the terminal itself turns "\n" into "\r\n")
    assert shown.count("\rlive:") >= 2 and re.search(r"live: 100%.*3/3", shown), shown
