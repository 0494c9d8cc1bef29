"""Readable training progress: one line per run with step/total, a bar, the loss, the learning rate and
an ETA (``train  120/500 [##........] loss 1.234  lr 2e-4  ETA 3m12s``).

A :class:`Progress` follows one run and hands :class:`Snapshot` s to a display. :class:`ConsoleProgress`
shows one run: redrawn in place on a terminal, a plain line at each logged step (and each evaluation)
otherwise, so logs and CI stay readable. :class:`ProgressBoard` shows several runs at once (parallel
ablation arms): one live line per running run on a terminal, and finished runs as permanent lines above.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, TextIO

BAR_WIDTH = 10
CLEAR = "\x1b[K"  # erase to the end of the line


@dataclass(frozen=True)
class Snapshot:
    """What a display shows of one run at one moment. ``kind`` says why it was taken: ``step`` (redraw
    only), ``log`` (new logged values: worth a plain line), ``eval`` (``metrics`` holds an evaluation),
    ``status`` (``status`` holds a phase such as ``evaluating``) or ``end`` (training finished)."""

    label: str
    step: int
    total: int
    loss: float | None = None
    lr: float | None = None
    eta: float | None = None  # seconds left; None until two steps have been timed
    kind: str = "step"
    metrics: dict[str, float] = field(default_factory=dict)
    status: str | None = None


def format_duration(seconds: float) -> str:
    """``45s``, ``3m12s``, ``2h05m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def format_number(value: float) -> str:
    """A loss or metric as four significant digits; a tiny one (a learning rate) as ``2e-4``."""
    if value != 0 and abs(value) < 1e-3:
        mantissa, exponent = f"{value:.1e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.4g}"


def render_line(snapshot: Snapshot, label_width: int = 0) -> str:
    """The progress line of ``snapshot``: label, step/total, bar, loss, lr, then ETA or the status."""
    s = snapshot
    filled = min(BAR_WIDTH, BAR_WIDTH * s.step // s.total) if s.total > 0 else 0
    parts = [f"{s.label:<{label_width}}  {s.step:>{len(str(s.total))}}/{s.total} "
             f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}]"]
    if s.loss is not None:
        parts.append(f"loss {format_number(s.loss)}")
    if s.lr is not None:
        parts.append(f"lr {format_number(s.lr)}")
    if s.status:
        parts.append(s.status)
    elif s.step < s.total:
        parts.append(f"ETA {format_duration(s.eta) if s.eta is not None else '?'}")
    return "  ".join(parts)


def render_eval(snapshot: Snapshot, label_width: int = 0) -> str:
    """The line of an evaluation: label, the step it happened at, and its metrics."""
    metrics = "  ".join(f"{name} {format_number(value)}" for name, value in snapshot.metrics.items())
    return f"{snapshot.label:<{label_width}}  eval at {snapshot.step}/{snapshot.total}  {metrics}"


class Progress:
    """Follows one run's steps and hands a :class:`Snapshot` to ``show`` at each change. The ETA is
    timed from the first step this process saw, so a resumed run's earlier steps do not skew it."""

    def __init__(self, label: str, show: Callable[[Snapshot], None], clock: Callable[[], float] = time.monotonic):
        self.show, self.clock = show, clock
        self.current = Snapshot(label, 0, 0)
        self._first: tuple[float, int] | None = None

    def begin(self, total: int, step: int = 0) -> None:
        """Shows nothing yet: what the first step prints (e.g. which kernels run) starts on a line of its own."""
        self.current = replace(self.current, step=step, total=total, kind="step")
        self._first = None

    def update(self, step: int, loss: float | None = None, lr: float | None = None, logged: bool = False) -> None:
        """Step ``step`` is done; ``logged`` marks values the run logs (a plain display prints those)."""
        now = self.clock()
        if self._first is None:
            self._first = (now, step)
        start, first = self._first
        eta = (now - start) / (step - first) * max(0, self.current.total - step) if step > first else None
        self.current = replace(self.current, step=step, eta=eta if eta is not None else self.current.eta,
                               loss=self.current.loss if loss is None else loss,
                               lr=self.current.lr if lr is None else lr, kind="log" if logged else "step")
        self.show(self.current)

    def evaluated(self, metrics: dict[str, float], step: int | None = None) -> None:
        step = self.current.step if step is None else step
        self.show(replace(self.current, step=step, kind="eval", metrics=dict(metrics)))

    def status(self, text: str) -> None:
        self.current = replace(self.current, kind="status", status=text)
        self.show(self.current)

    def end(self) -> None:
        self.current = replace(self.current, kind="end")
        self.show(self.current)


def _fit(line: str, stream: TextIO) -> str:
    """``line`` cut to the terminal's width (a longer one would wrap, and redrawing in place would fail)."""
    return line[:max(20, shutil.get_terminal_size().columns - 1)] if stream.isatty() else line


class ConsoleProgress:
    """Shows one run's snapshots: in place on a terminal (at most every ``interval`` seconds), or as a
    plain line through ``log`` at each logged step, evaluation and the end otherwise."""

    def __init__(self, stream: TextIO | None = None, log: Callable[[str], Any] = print, interval: float = 0.2,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.log, self.interval, self.clock = log, interval, clock
        self._drawn = -float("inf")
        self._last = ""

    def __call__(self, snapshot: Snapshot) -> None:
        if snapshot.kind == "eval":
            self._write_line(render_eval(snapshot))
        elif self.tty:
            now = self.clock()
            if snapshot.kind != "step" or now - self._drawn >= self.interval:
                self._drawn = now
                self.stream.write("\r" + _fit(render_line(snapshot), self.stream) + CLEAR
                                  + ("\n" if snapshot.kind == "end" else ""))
                self.stream.flush()
        elif snapshot.kind in ("log", "end", "status"):
            line = render_line(snapshot)
            if line != self._last:  # the end of a run that just logged its last step says nothing new
                self._last = line
                self.log(line)

    def _write_line(self, line: str) -> None:
        if self.tty:  # above the live line, which the next snapshot redraws
            self.stream.write("\r" + _fit(line, self.stream) + CLEAR + "\n")
            self.stream.flush()
            self._drawn = -float("inf")
        else:
            self.log(line)


class ProgressBoard:
    """Shows several runs at once, one line each. On a terminal the running runs' lines are redrawn in
    place below everything else, and a finished run's final line is printed once, permanently, above
    them; elsewhere each logged step, evaluation and final line is printed as it comes (via ``log``)."""

    def __init__(self, labels: list[str], stream: TextIO | None = None, log: Callable[[str], Any] = print,
                 interval: float = 0.2, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.log, self.interval, self.clock = log, interval, clock
        self.width = max((len(label) for label in labels), default=0)
        self.live: dict[str, str] = {}  # label -> its current line, in start order
        self._height = 0  # live lines on screen
        self._drawn = -float("inf")

    def show(self, snapshot: Snapshot) -> None:
        """A snapshot of a running run (its label names its line)."""
        if snapshot.kind == "eval":
            self.print(render_eval(snapshot, self.width))
            return
        line = render_line(snapshot, self.width)
        self.live[snapshot.label] = line
        if not self.tty:
            if snapshot.kind in ("log", "status"):
                self.log(line)
        elif snapshot.kind != "step" or self.clock() - self._drawn >= self.interval:
            self._redraw()

    def start(self, label: str, text: str = "starting") -> None:
        self.live[label] = f"{label:<{self.width}}  {text}"
        if self.tty:
            self._redraw()

    def finish(self, label: str, text: str) -> None:
        """``label`` is done: its line becomes ``text`` after the label, printed for good."""
        self.live.pop(label, None)
        self.print(f"{label:<{self.width}}  {text}")

    def print(self, line: str) -> None:
        """A permanent line, above the live ones."""
        if not self.tty:
            self.log(line)
            return
        self._clear()
        self.stream.write(_fit(line, self.stream) + "\n")
        self._redraw()

    def close(self) -> None:
        """Leave the live lines where they are (the cursor below them)."""
        self._height = 0

    def _clear(self) -> None:
        if self._height:
            self.stream.write(f"\x1b[{self._height}F")  # to the start of the first live line
            self.stream.write("".join(CLEAR + "\n" for _ in range(self._height)))
            self.stream.write(f"\x1b[{self._height}F")
        self._height = 0

    def _redraw(self) -> None:
        self._clear()
        for line in self.live.values():
            self.stream.write(_fit(line, self.stream) + CLEAR + "\n")
        self._height = len(self.live)
        self._drawn = self.clock()
        self.stream.flush()
