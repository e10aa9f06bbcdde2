"""A finished sweep as a table (printed and CSV), a PSNR-per-trial plot and the best config.

One :class:`TrialRow` per Tune trial, read from the ``ResultGrid``: the swept values, the best
validation PSNR with the SSIM of that same validation (the checkpoint that would be exported),
the epochs run and whether ASHA stopped the trial before its planned horizon.
"""

from __future__ import annotations

import copy
import csv
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from ray.tune import ResultGrid

from hdm_platform.config import ExperimentConfig, apply_overrides, validate_config

__all__ = [
    "TrialRow",
    "best_row",
    "collect_rows",
    "format_cell",
    "format_table",
    "plot_val_psnr",
    "write_best_config",
    "write_csv",
]

_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class TrialRow:
    """One trial of a sweep, as the table, the plot and the challenger export use it."""

    trial_id: str
    params: dict[str, Any]
    failed: bool
    validations: int
    epochs_run: int
    stopped_early: bool
    best_psnr: float | None = None
    best_ssim: float | None = None
    #: The metrics reported with the best-PSNR checkpoint (``step``, ``checkpoint_path``, ...).
    best_metrics: dict[str, Any] = field(default_factory=dict)
    #: (epochs run, validation PSNR) after each validation, in order.
    history: list[tuple[int, float]] = field(default_factory=list)
    error: str | None = None

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        return "stopped early" if self.stopped_early else "finished"


def collect_rows(
    results: ResultGrid, keys: Sequence[str], horizon: Callable[[str, Mapping[str, Any]], int]
) -> list[TrialRow]:
    """Rows in trial order; ``horizon(trial_id, params)`` is how many validations it could run.

    A trial that ended without error before its horizon was stopped by the scheduler.
    """
    rows = []
    for result in results:
        last = result.metrics or {}
        trial_id = last["trial_id"]
        config = result.config or {}
        frame = result.metrics_dataframe
        reports = frame.to_dict("records") if frame is not None and "val_psnr" in frame else []
        reports = [report for report in reports if not math.isnan(report["val_psnr"])]
        validations = len(reports)
        params = {key: config.get(key) for key in keys}
        row = TrialRow(
            trial_id=trial_id,
            params=params,
            failed=result.error is not None,
            validations=validations,
            # The loop reports the 0-based epoch it validated in.
            epochs_run=int(reports[-1]["epoch"]) + 1 if reports else 0,
            stopped_early=result.error is None and validations < horizon(trial_id, params),
            history=[(int(report["epoch"]) + 1, float(report["val_psnr"])) for report in reports],
            error=_error_summary(result.error) if result.error is not None else None,
        )
        if reports:
            best = max(reports, key=lambda report: report["val_psnr"])
            row.best_psnr = float(best["val_psnr"])
            row.best_ssim = float(best["val_ssim"])
            row.best_metrics = {key: value for key, value in best.items() if _is_plain(value)}
        rows.append(row)
    return sorted(rows, key=lambda row: row.trial_id)


def best_row(rows: Sequence[TrialRow]) -> TrialRow | None:
    """The trial with the highest validation PSNR among those that did not fail."""
    scored = [row for row in rows if not row.failed and row.best_psnr is not None]
    return max(scored, key=lambda row: row.best_psnr) if scored else None  # type: ignore[arg-type, return-value]


def _columns(keys: Sequence[str]) -> list[str]:
    return ["trial", *keys, "best_val_psnr", "val_ssim", "epochs_run", "validations", "status"]


def _values(row: TrialRow, keys: Sequence[str]) -> list[Any]:
    return [
        row.trial_id,
        *(row.params.get(key) for key in keys),
        row.best_psnr,
        row.best_ssim,
        row.epochs_run,
        row.validations,
        row.status,
    ]


def format_table(rows: Sequence[TrialRow], keys: Sequence[str]) -> str:
    """The results table as aligned text; the best trial is marked with ``*``."""
    best = best_row(rows)
    grid = [_columns(keys)]
    for row in rows:
        cells = [format_cell(value) for value in _values(row, keys)]
        cells[0] = f"{cells[0]}{' *' if row is best else ''}"
        grid.append(cells)
    widths = [max(len(line[column]) for line in grid) for column in range(len(grid[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in grid]
    lines.insert(1, "  ".join("-" * width for width in widths))
    failed = [row for row in rows if row.failed]
    lines += [f"{row.trial_id} failed: {row.error}" for row in failed]
    lines.append("val_ssim is the SSIM of the best-PSNR validation; * the best trial.")
    return "\n".join(lines)


def write_csv(rows: Sequence[TrialRow], keys: Sequence[str], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*_columns(keys), "error"])
        for row in rows:
            writer.writerow([*("" if value is None else value for value in _values(row, keys)), row.error or ""])
    return path


def plot_val_psnr(rows: Sequence[TrialRow], keys: Sequence[str], path: Path, *, title: str) -> Path:
    """Validation PSNR per trial against epochs; a cross ends the trials ASHA stopped."""
    # A bare Figure (no pyplot): no global state and no display backend on a cluster head.
    figure = Figure(figsize=(8, 5), dpi=100)
    axes = figure.subplots()
    for row in rows:
        if not row.history:
            continue
        epochs, psnr = zip(*row.history, strict=True)
        values = ", ".join(f"{key.rsplit('.', 1)[-1]}={format_cell(row.params.get(key))}" for key in keys)
        (line,) = axes.plot(epochs, psnr, marker="o", markersize=3, label=f"{row.trial_id}: {values}")
        if row.stopped_early:
            axes.plot(epochs[-1], psnr[-1], marker="x", markersize=10, color=line.get_color())
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation PSNR (dB)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    if axes.lines:
        axes.legend(fontsize="x-small", loc="best")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


def write_best_config(
    base: dict[str, Any], row: TrialRow, path: Path, *, name: str, header: str
) -> ExperimentConfig:
    """Write the base experiment with the best trial's values as a ready-to-run YAML.

    The file keeps the base config's own keys (plus the swept ones) rather than every
    default, gets its own ``name`` and drops any ``run.name``, so training it starts a new
    run instead of resuming the base experiment's. Returns the config as it will load.
    """
    raw = apply_overrides(copy.deepcopy(base), row.params.items())
    raw["name"] = name
    if isinstance(raw.get("run"), dict):
        raw["run"].pop("name", None)
    config = validate_config(copy.deepcopy(raw), source=str(path))
    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(comment + yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return config


def format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}".rstrip("0").rstrip(".")
    return str(value)


def _error_summary(error: BaseException) -> str:
    """The exception a trial died of (``Type: message``): the last line of Ray's traceback."""
    lines = [line.strip() for line in _ANSI_ESCAPE.sub("", str(error)).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _is_plain(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) and not (isinstance(value, float) and math.isnan(value))
