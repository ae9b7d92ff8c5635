"""Recognize the Longformer mask family in an attnkit mask expression (for the banded backend).

Accepted, in any operand order::

    window                                   window := sliding_window(l, r, dilation=d)
    window | global_tokens(g)                        | causal() & sliding_window(...)
    (window [| global_tokens(g)]) & key_padding(...) [& key_padding(...)]

``causal() & sliding_window(l, r, d)`` is ``sliding_window(l, 0, d)`` (a dilated window's keys
after the query are the t > 0 ones); two windows with one dilation intersect to one window.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..masks import And, Causal, GlobalTokens, KeyPadding, Mask, Or, SlidingWindow

FAMILY = ("sliding_window(l, r, dilation=d) [& causal()], optionally | global_tokens(...), "
          "optionally & key_padding(...)")


@dataclass(frozen=True)
class Pattern:
    """A Longformer mask, taken apart: the window, the global tokens, the key paddings."""

    window: SlidingWindow
    global_tokens: GlobalTokens | None
    paddings: tuple[KeyPadding, ...]

    def dilations(self, H: int) -> list[int]:
        """One dilation per query head."""
        d = self.window.dilation
        return list(d) if isinstance(d, tuple) else [d] * H

    def key_valid(self, Nk: int, device) -> Tensor | None:
        """(Bv, Nk) bool, True = a real key (the AND of every key_padding), or None."""
        valid = None
        for p in self.paddings:
            v = p._valid(Nk, device)
            valid = v if valid is None else valid & v
        return valid

    def global_flags(self, Nk: int, device) -> Tensor | None:
        """(Bg, Nk) bool, True at global positions, or None."""
        return None if self.global_tokens is None else self.global_tokens._flags(Nk, device)


def _factors(m: Mask) -> list[Mask]:
    """The operands of a tree of ``&``."""
    return _factors(m.a) + _factors(m.b) if isinstance(m, And) else [m]


def _window_of(parts: list[Mask]) -> SlidingWindow | str:
    """One window from ``&``-ed windows and causal masks, or the reason there is none."""
    windows = [p for p in parts if isinstance(p, SlidingWindow)]
    others = [p for p in parts if not isinstance(p, (SlidingWindow, Causal))]
    if others:
        return f"{others[0]!r} is not part of the Longformer family ({FAMILY})"
    if not windows:
        return f"no sliding_window in the mask; banded needs one ({FAMILY})"
    if len({w.dilation for w in windows}) > 1:
        return "windows with different dilations do not intersect to one window"
    left, right = min(w.left for w in windows), min(w.right for w in windows)
    if len(windows) < len(parts):  # a causal() among the factors
        right = 0
    return SlidingWindow(left, right, windows[0].dilation)


def parse(mask: Mask | None) -> Pattern | str:
    """The mask as a Pattern, or a string saying why it is not of the family."""
    if mask is None:
        return f"no mask: banded needs a sliding window ({FAMILY})"
    factors = _factors(mask)
    paddings = tuple(f for f in factors if isinstance(f, KeyPadding))
    rest = [f for f in factors if not isinstance(f, KeyPadding)]
    glob = None
    if len(rest) == 1 and isinstance(rest[0], Or):
        a, b = rest[0].a, rest[0].b
        glob, local = (a, b) if isinstance(a, GlobalTokens) else (b, a)
        if not isinstance(glob, GlobalTokens):
            return f"{mask!r}: banded takes '|' only with global_tokens ({FAMILY})"
        rest = _factors(local)
    window = _window_of(rest)
    return window if isinstance(window, str) else Pattern(window, glob, paddings)


def band_span(pattern: Pattern) -> int:
    """Positions one query's window spans (left + right, times the largest dilation, + 1)."""
    w = pattern.window
    return (w.left + w.right) * max(w.dilation if isinstance(w.dilation, tuple) else (w.dilation,)) + 1

