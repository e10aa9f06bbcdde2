"""``hdm tune``'s one display: the trials' table as they report, instead of Tune's own output.

Tune's reporter prints its status box every few seconds and, with Ray's log forwarding,
every trial's worker lines beside it. The sweep turns both off (``hdm -v`` turns them back
on) and shows this callback's display, driven by Tune's public ``Callback`` hooks:

* on a terminal, one table of every trial (swept values, status, epochs, last and best
  validation PSNR) under a summary line, redrawn in place when a trial starts, validates,
  ends or fails;
* when the output is captured (a file, a pipe, a Ray job's log), one line per such event:
  the event, then how many trials run, wait, ended and failed, and the best so far.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from ray.tune import Callback

from hdm_platform.tune.report import format_cell

__all__ = ["SweepProgress"]

# Tune's trial statuses, as this display names them.
_STATUS = {"PENDING": "pending", "RUNNING": "running", "PAUSED": "paused", "TERMINATED": "ended", "ERROR": "failed"}
_REDRAW = "\x1b[{lines}F\x1b[J"  # up to the table's first line, then clear to the end


@dataclass
class _TrialScores:
    epochs: int = 0
    last_psnr: float | None = None
    best_psnr: float | None = None


class SweepProgress(Callback):
    """Shows the sweep's trials as they report (``val_psnr`` after each validation)."""

    def __init__(self, keys: Sequence[str], *, stream: TextIO | None = None, redraw: bool | None = None) -> None:
        self._keys = list(keys)
        # Tune pickles its run config (this callback included) to resume a sweep, so the
        # console is looked up when the display prints, not held.
        self._stream = stream
        self._redraw = redraw
        self._scores: dict[str, _TrialScores] = {}
        self._drawn_lines = 0
        self._started = time.monotonic()

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trials, f"trial {trial.trial_id} started ({self._params(trial)})")

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: Mapping[str, Any], **info: Any
    ) -> None:
        psnr = result.get("val_psnr")
        if not isinstance(psnr, int | float) or math.isnan(psnr):
            return
        scores = self._scores.setdefault(trial.trial_id, _TrialScores())
        # The training loop reports the 0-based epoch it validated in.
        scores.epochs = int(result.get("epoch", scores.epochs)) + 1
        scores.last_psnr = float(psnr)
        scores.best_psnr = max(float(psnr), scores.best_psnr or -math.inf)
        self._show(trials, f"trial {trial.trial_id} epoch {scores.epochs}: val_psnr {psnr:.2f}")

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trials, f"trial {trial.trial_id} ended", ended=[trial])

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trials, f"trial {trial.trial_id} failed (its error is in the table at the end)", failed=[trial])

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._show(trials, f"trial {trial.trial_id} failed; trying it again")

    def _show(self, trials: list[Any], event: str, *, ended: Sequence[Any] = (), failed: Sequence[Any] = ()) -> None:
        # Tune calls the completion hooks before it sets the trial's new status.
        statuses = {trial.trial_id: _STATUS.get(trial.status, trial.status.lower()) for trial in trials}
        statuses.update({trial.trial_id: "ended" for trial in ended})
        statuses.update({trial.trial_id: "failed" for trial in failed})
        summary = self._summary(statuses)
        stream = self._stream if self._stream is not None else sys.stdout
        if not (stream.isatty() if self._redraw is None else self._redraw):
            print(f"[{self._elapsed()}] {event} | {summary}", file=stream, flush=True)
            return
        lines = [f"sweep [{self._elapsed()}] {summary}", *self._table(trials, statuses), f"last: {event}"]
        prefix = _REDRAW.format(lines=self._drawn_lines) if self._drawn_lines else ""
        print(prefix + "\n".join(lines), file=stream, flush=True)
        self._drawn_lines = len(lines)

    def _summary(self, statuses: Mapping[str, str]) -> str:
        counts = [f"{sum(status == name for status in statuses.values())} {name}" for name in ("running", "pending", "ended", "failed")]
        scored = [(scores.best_psnr, trial_id) for trial_id, scores in self._scores.items() if scores.best_psnr is not None]
        best = "best val_psnr {:.2f} ({})".format(*max(scored)) if scored else "no validation yet"
        return f"{', '.join(counts)}; {best}"

    def _table(self, trials: list[Any], statuses: Mapping[str, str]) -> list[str]:
        grid = [["trial", *self._keys, "status", "epochs", "val_psnr", "best"]]
        for trial in sorted(trials, key=lambda trial: trial.trial_id):
            scores = self._scores.get(trial.trial_id, _TrialScores())
            grid.append([
                trial.trial_id,
                *(format_cell(trial.config.get(key)) for key in self._keys),
                statuses[trial.trial_id],
                str(scores.epochs),
                format_cell(scores.last_psnr),
                format_cell(scores.best_psnr),
            ])  # fmt: skip
        widths = [max(len(row[column]) for row in grid) for column in range(len(grid[0]))]
        return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in grid]

    def _params(self, trial: Any) -> str:
        return ", ".join(f"{key}={format_cell(trial.config.get(key))}" for key in self._keys)

    def _elapsed(self) -> str:
        minutes, seconds = divmod(int(time.monotonic() - self._started), 60)
        return f"{minutes:d}:{seconds:02d}"
