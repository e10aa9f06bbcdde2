"""Options several commands share, declared once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]

__all__ = ["experiment_option", "overrides_option", "timeout_option"]


def experiment_option(example: str) -> Decorator:
    """``--config YAML``: the experiment file, e.g. ``example``."""
    return click.option(
        "--config", "config_path", required=True, metavar="YAML",
        help=f"Experiment file (path or URI), e.g. {example}.",
    )  # fmt: skip


def overrides_option(example: str) -> Decorator:
    """``--set KEY=VALUE`` (repeatable), applied before validation."""
    return click.option(
        "--set", "overrides", multiple=True, metavar="KEY=VALUE",
        help=f"Override a config field, e.g. --set {example} (repeatable).",
    )  # fmt: skip


def timeout_option(default_s: float) -> Decorator:
    """``--timeout SECONDS`` of a command that waits for the cluster."""
    return click.option(
        "--timeout", type=click.FloatRange(min=1), default=default_s, show_default=True,
        help="Seconds to wait.",
    )  # fmt: skip
