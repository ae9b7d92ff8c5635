"""Progress of the long commands (``attnkit train``, ``attnkit bench``): tqdm, also readable in a log.

On a terminal this is plain tqdm: one line redrawn in place. Sent to a file or a pipe, tqdm's
redraws (``"\\r" + line``) would pile up into one giant line (tqdm has no line mode of its own:
tqdm issue #750), so there the stream is wrapped so that each redraw becomes a line of its own,
written at most every ``LOG_INTERVAL_S`` seconds (plus the first and the last), each at most
``LOG_WIDTH`` characters, in ASCII: a log of an hour's run stays a few hundred short lines.
"""

from __future__ import annotations

import re
import sys
from typing import TextIO

from tqdm import tqdm

__all__ = ["LOG_INTERVAL_S", "LOG_WIDTH", "progress_bar"]

LOG_INTERVAL_S = 30.0  # seconds between two lines of progress in a log
LOG_WIDTH = 120  # characters per line of progress in a log


class _LineStream:
    """A text stream for tqdm that turns its in-place redraws into lines: every piece of text
    between ``\\r`` / ``\\n`` becomes one line, trailing padding dropped, blank pieces skipped."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        for piece in re.split(r"[\r\n]", text):
            if piece.strip():
                self.stream.write(piece.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


class _LogBar(tqdm):
    """tqdm for a log: a redraw that shows no new count or postfix (tqdm's final redraw on
    ``close`` right after the last update) is not written again."""

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg is None:
            shown = (self.n, self.postfix)
            if shown == getattr(self, "_shown", None):
                return True
            self._shown = shown
        return super().display(msg, pos)


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def progress_bar(desc: str, total: int | None, *, unit: str = "it", stream: TextIO | None = None) -> tqdm:
    """A tqdm bar on ``stream`` (default: stderr) counting ``total`` ``unit``s.

    Use it as tqdm (``update``, ``set_postfix_str(..., refresh=False)``, ``close``); print other
    output meanwhile with ``tqdm.write`` so a terminal bar is not overwritten.
    """
    stream = sys.stderr if stream is None else stream
    if _is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True)
    return _LogBar(total=total, desc=desc, unit=unit, file=_LineStream(stream), ncols=LOG_WIDTH, ascii=True,
                   mininterval=LOG_INTERVAL_S, maxinterval=LOG_INTERVAL_S)
