"""``hdm model``: inspect HDM architectures and checkpoints, import the published weights,
list and promote registered versions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import click
import yaml

from hdm_model.config import VARIANT_NAMES, variant_config
from hdm_platform.config import resolve_tracking_uri
from hdm_platform.vocabulary import TASKS, registered_model_name

if TYPE_CHECKING:
    from hdm_model import HDM

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
    """Model architectures, and the registered models (one per task: hdm-dehaze, hdm-derain, hdm-lowlight)."""


def _checkpoint_network(checkpoint: str, variant: str | None, assignments: tuple[str, ...]) -> HDM:
    from hdm_platform.model_refs import load_model

    if variant is not None or assignments:
        raise click.UsageError("--checkpoint describes its own network; do not pass --variant or --set")
    try:
        return load_model(checkpoint)
    except (OSError, ValueError) as error:
        raise click.ClickException(f"cannot read checkpoint {checkpoint}: {error}") from error


@model.command()
@click.option(
    "--variant",
    type=click.Choice(VARIANT_NAMES),
    default=None,
    help="Paper Table 5 variant.  [default: HDM]",
)
@click.option(
    "--set",
    "assignments",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an HDMConfig field (optionally prefixed 'model.'); repeatable.",
)
@click.option("--checkpoint", help="Count a checkpoint's network instead (folder, URI or models:/...).")
def summary(variant: str | None, assignments: tuple[str, ...], checkpoint: str | None) -> None:
    """Print the parameter count of each component and the total."""
    if checkpoint is not None:
        network = _checkpoint_network(checkpoint, variant, assignments)
        config, title = network.config, f"checkpoint {checkpoint}"
    else:
        variant = variant or "HDM"
        try:
            config = variant_config(variant, **parse_overrides(assignments))
        except (TypeError, ValueError) as error:
            raise click.BadParameter(str(error), param_hint="--set") from error
        from hdm_model import build_hdm

        network, title = build_hdm(config), f"variant {variant}"
    counts = {
        name: sum(p.numel() for p in getattr(network, name).parameters())
        if getattr(network, name) is not None
        else 0
        for name in _COMPONENTS
    }
    total = sum(p.numel() for p in network.parameters())
    click.echo(f"{title}: {config.num_groups}x{config.blocks_per_group} blocks, "
               f"{config.channels} channels, order {config.order}, mask source {config.mask_source}")
    width = max(map(len, _COMPONENTS)) + 2
    for name, count in counts.items():
        click.echo(f"  {name:<{width}}{count:>12,}")
    click.echo(f"  {'total':<{width}}{total:>12,}  ({total / 1e6:.2f}M)")


@model.command()
@click.argument("task", type=click.Choice(TASKS))
@click.argument("version", type=int)
@click.option("--alias", default="champion", show_default=True)
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else local SQLite.")
@click.option("--name", default=None, help="Registered model name (default: hdm-TASK).")
def promote(task: str, version: int, alias: str, tracking_uri: str | None, name: str | None) -> None:
    """Point ALIAS (default champion) at VERSION of the task's registered model."""
    from hdm_platform.tracking.registry import registry_client, set_alias

    model_name = name or registered_model_name(task)
    client = registry_client(resolve_tracking_uri(tracking_uri))
    try:
        promoted = set_alias(client, name=model_name, version=version, alias=alias)
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{model_name}@{alias} -> version {promoted.version} (run {promoted.run_id})")


@model.command(name="list")
@click.argument("task", type=click.Choice(TASKS))
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else local SQLite.")
@click.option("--name", default=None, help="Registered model name (default: hdm-TASK).")
def list_models(task: str, tracking_uri: str | None, name: str | None) -> None:
    """Versions of the task's registered model, newest first, with their aliases."""
    from hdm_platform.tracking.registry import list_versions, registry_client

    model_name = name or registered_model_name(task)
    versions = list_versions(registry_client(resolve_tracking_uri(tracking_uri)), model_name)
    if not versions:
        click.echo(f"{model_name}: no versions registered")
        return
    for version in versions:
        aliases = ",".join(sorted(version.aliases)) or "-"
        click.echo(f"{model_name} v{version.version}  aliases={aliases}  run={version.run_id}")


@model.command(name="import-published")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")
@click.option("--register", is_flag=True, help="Also register it as a version of hdm-TASK in MLflow.")
@click.option("--task", type=click.Choice(TASKS), default="dehaze", show_default=True)
@click.option("--alias", default=None, help="With --register: point this alias at the version.")
@click.option("--tracking-uri", default=None, help="Default: $MLFLOW_TRACKING_URI, else local SQLite.")
@click.option("--name", default=None, help="Registered model name (default: hdm-TASK).")
def import_published(
    file: str, out_dir: str, register: bool, task: str, alias: str | None, tracking_uri: str | None,
    name: str | None,
) -> None:  # fmt: skip
    """Convert the authors' published weights FILE (hdm_haze_sots.pk) into a checkpoint."""
    from hdm_model.published import PublishedCheckpointError
    from hdm_model.published import import_published as convert

    try:
        conversion, metadata = convert(file, out_dir, task=task)
    except (PublishedCheckpointError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from None
    click.echo(
        f"converted {conversion.used_tensors} tensors ({conversion.used_values:,} parameters) "
        f"of {file} into {out_dir} (blocks_per_group=9, the authors' test-script masks)"
    )
    click.echo(
        f"dropped {len(conversion.dropped)} tensors ({conversion.dropped_values:,} values) "
        f"that DR_Net_phy.forward never uses: {', '.join(conversion.dropped)}"
    )
    if register:
        from hdm_platform.tracking.imports import register_imported

        name = name or registered_model_name(task)
        origin = {f"hdm.{key}": str(metadata[key]) for key in metadata if key.startswith("origin")}
        version, created = register_imported(
            out_dir, name=name, task=task, alias=alias, origin_tags=origin,
            tracking_uri=resolve_tracking_uri(tracking_uri),
        )  # fmt: skip
        state = "registered" if created else "already registered"
        click.echo(f"{state}: {name} v{version.version} (models:/{name}/{version.version})")
