"""``hdm model``: inspect HDM architectures."""

from __future__ import annotations

from typing import Any

import click
import yaml

from hdm_model.hdm import VARIANTS, build_hdm, variant_config

__all__ = ["model", "parse_overrides"]

_COMPONENTS = ("encoder", "groups", "structure", "region", "decoder")
_MODEL_PREFIX = "model."


def parse_overrides(assignments: tuple[str, ...]) -> dict[str, Any]:
    """``("channels=32", "model.order=PRS")`` -> ``{"channels": 32, "order": "PRS"}``.

    Values are YAML scalars or flow collections (``input_mean=[0.5,0.5,0.5]``).
    """
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, separator, value = assignment.partition("=")
        if not separator or not key:
            raise click.BadParameter(f"{assignment!r} is not KEY=VALUE", param_hint="--set")
        key = key.removeprefix(_MODEL_PREFIX)
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise click.BadParameter(f"value of {key!r} is not valid YAML: {error}", param_hint="--set")
    return overrides


@click.group()
def model() -> None:
    """Inspect HDM model architectures."""


@model.command()
@click.option(
    "--variant",
    type=click.Choice(list(VARIANTS)),
    default="HDM",
    show_default=True,
    help="Paper Table 5 variant.",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an HDMConfig field (optionally prefixed 'model.'); repeatable.",
)
def summary(variant: str, assignments: tuple[str, ...]) -> None:
    """Print the parameter count of each component and the total."""
    try:
        config = variant_config(variant, **parse_overrides(assignments))
    except (TypeError, ValueError) as error:
        raise click.BadParameter(str(error), param_hint="--set") from error
    network = build_hdm(config)
    counts = {
        name: sum(p.numel() for p in getattr(network, name).parameters())
        if getattr(network, name) is not None
        else 0
        for name in _COMPONENTS
    }
    total = sum(p.numel() for p in network.parameters())
    click.echo(f"variant {variant}: {config.num_groups}x{config.blocks_per_group} blocks, "
               f"{config.channels} channels, order {config.order}, mask source {config.mask_source}")
    width = max(map(len, _COMPONENTS)) + 2
    for name, count in counts.items():
        click.echo(f"  {name:<{width}}{count:>12,}")
    click.echo(f"  {'total':<{width}}{total:>12,}  ({total / 1e6:.2f}M)")
