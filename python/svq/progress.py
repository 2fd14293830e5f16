"""Progress of long work on stderr (``svq demo``, ``svq migrate``, ``svq bench``), shown
only to a person: when stderr is a terminal and the output is not ``--json``. tqdm draws
it (small, no dependencies of its own, and it redraws in place without flooding a log).

>>> with bar(100, "frames", show=False) as b:
...     b.update(10)
>>> b.n
10
"""

from __future__ import annotations

import importlib
import os
import sys
from types import TracebackType
from typing import Protocol


class Bar(Protocol):
    """What svq's commands use of a progress bar."""

    n: float

    def update(self, n: float = 1) -> object: ...
    def set_description_str(self, desc: str) -> None: ...
    def close(self) -> None: ...


class _Silent:
    """A bar that draws nothing (a pipe, ``--json``, or tqdm not installed)."""

    def __init__(self) -> None:
        self.n: float = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_description_str(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


class _Scope:
    def __init__(self, bar: Bar) -> None:
        self.bar = bar

    def __enter__(self) -> Bar:
        return self.bar

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.bar.close()


def wanted(json_output: bool) -> bool:
    """Whether to draw: a person is watching stderr and the output is for a person."""
    return not json_output and sys.stderr.isatty()


def bar(total: float | None, unit: str, *, show: bool, desc: str = "") -> _Scope:
    """A progress bar over ``total`` units (``with bar(...) as b: b.update(n)``); silent
    unless ``show``."""
    if show:
        try:
            tqdm = importlib.import_module("tqdm").tqdm
        except ImportError:  # svq works without it, silently
            return _Scope(_Silent())
        # The terminal's size, 80x24 when it reports none (tqdm would then draw nothing).
        size = os.get_terminal_size(sys.stderr.fileno()) if sys.stderr.isatty() else os.terminal_size((0, 0))
        shape = {"ncols": size.columns or 80, "nrows": size.lines or 24}
        drawn: Bar = tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False, unit_scale=True, **shape)
        return _Scope(drawn)
    return _Scope(_Silent())
