"""``hdm serve``: deploy the HTTP inference configs in ``serve_configs/`` and manage them.

``up``, ``status`` and ``down`` use the dashboard's Serve REST API at ``--address``
(``$RAY_DASHBOARD_ADDRESS``, else ``http://127.0.0.1:8265``) with the Ray token, as
``hdm submit`` does; ``reload`` connects to the cluster as a Ray driver, which with token
authentication needs ``RAY_AUTH_MODE=token`` in the shell (cluster.yaml's nodes set it).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hdm_platform.cli.options import timeout_option
from hdm_platform.cli.submit import auth_headers
from hdm_platform.config import ConfigError
from hdm_platform.vocabulary import TASKS
from hdm_platform.serve.control import (
    DeployFailedError,
    deploy,
    read_serve_config,
    reload_task,
    remove_application,
    serve_details,
    wait_until_removed,
    wait_until_running,
)
from hdm_platform.serve.settings import DEFAULT_APP_NAME

__all__ = ["serve"]

_DEFAULT_DASHBOARD = "http://127.0.0.1:8265"
# Serve's name for an application whose config gives none.
_SERVE_DEFAULT_APP_NAME = "default"

dashboard_address = click.option(
    "--address",
    default=lambda: os.environ.get("RAY_DASHBOARD_ADDRESS", _DEFAULT_DASHBOARD),
    show_default=f"$RAY_DASHBOARD_ADDRESS or {_DEFAULT_DASHBOARD}",
    help="The Ray dashboard, which serves the Serve REST API.",
)


@contextlib.contextmanager
def _rest_api(address: str) -> Iterator[dict[str, str]]:
    """The headers to send, and the REST client's failures as one clear error."""
    from ray.exceptions import AuthenticationError

    try:
        yield auth_headers(os.environ)
    except (ConnectionError, RuntimeError, AuthenticationError) as error:
        raise click.ClickException(f"Serve REST API at {address}: {error}") from None


def _base_url(details: dict[str, Any], route_prefix: str | None) -> str:
    http = details.get("http_options", {})
    return f"http://{http.get('host')}:{http.get('port')}{route_prefix or ''}"


def _describe(name: str, app: dict[str, Any], details: dict[str, Any]) -> list[str]:
    lines = [f"{name}: {app['status']}  {_base_url(details, app.get('route_prefix'))}"]
    if app.get("message"):
        lines.append(f"  {app['message'].strip()}")
    for deployment_name, deployment in app.get("deployments", {}).items():
        running = sum(replica["state"] == "RUNNING" for replica in deployment.get("replicas", []))
        lines.append(
            f"  {deployment_name:<10} {deployment['status']:<10} "
            f"{running}/{deployment.get('target_num_replicas', '?')} replicas running"
        )
        if deployment.get("message"):
            lines.append(f"    {deployment['message'].strip()}")
    return lines


@click.group()
def serve() -> None:
    """HTTP inference with Ray Serve: the configs in serve_configs/."""


@serve.command()
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@dashboard_address
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until every application runs."
)
@timeout_option(600)
@click.option(
    "--set", "overrides", multiple=True, metavar="KEY=VALUE",
    help="Override a field of CONFIG before validation, e.g. --set http_options.port=8123 (repeatable).",
)  # fmt: skip
def up(config: Path, address: str, wait: bool, timeout: float, overrides: tuple[str, ...]) -> None:
    """Deploy CONFIG (validated first); it replaces every application on the cluster."""
    try:
        raw = read_serve_config(config, overrides)
    except ConfigError as error:
        raise click.UsageError(str(error)) from None
    names = [app.get("name", _SERVE_DEFAULT_APP_NAME) for app in raw["applications"]]
    with _rest_api(address) as headers:
        deploy(raw, address=address, headers=headers)
        click.echo(f"deploying {', '.join(names)} from {config}")
        if not wait:
            return
        started = time.monotonic()

        def show(line: str) -> None:
            click.echo(f"[{time.monotonic() - started:4.0f} s] {line}")

        try:
            wait_until_running(names, address=address, headers=headers, timeout_s=timeout, on_progress=show)
        except (DeployFailedError, TimeoutError) as error:
            raise click.ClickException(str(error)) from None
        details = serve_details(address=address, headers=headers)
    for name in names:
        click.echo("\n".join(_describe(name, details["applications"][name], details)))


@serve.command()
@dashboard_address
def status(address: str) -> None:
    """Each application, its URL, and its deployments' replicas."""
    with _rest_api(address) as headers:
        details = serve_details(address=address, headers=headers)
    applications = details.get("applications", {})
    if not applications:
        click.echo("no Serve applications are running")
        return
    for name, app in applications.items():
        click.echo("\n".join(_describe(name, app, details)))


@serve.command()
@dashboard_address
@click.option("--app", "app_name", help="Remove only this application (default: all, and Serve).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@timeout_option(300)
def down(address: str, app_name: str | None, yes: bool, timeout: float) -> None:
    """Remove an application, or all of them; waits until they are gone."""
    what = f"application {app_name}" if app_name else "every Serve application"
    if not yes:
        click.confirm(f"Remove {what} at {address}?", abort=True)
    with _rest_api(address) as headers:
        try:
            remove_application(app_name, address=address, headers=headers)
            wait_until_removed(app_name, address=address, headers=headers, timeout_s=timeout)
        except (ValueError, TimeoutError) as error:
            raise click.ClickException(str(error)) from None
    click.echo(f"removed {what}")


def _check_reachable(address: str | None, timeout_s: float = 5.0) -> None:
    """An explicit ``HOST:PORT`` that nothing answers on fails at once: ``ray.init`` would
    wait for the cluster for a minute or more."""
    if not address or address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not port.isdigit():
        raise click.BadParameter(f"{address!r} is not HOST:PORT", param_hint="--address")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as error:
        raise click.ClickException(f"cannot reach the Ray cluster at {address}: {error}") from None


@serve.command()
@click.argument("task", type=click.Choice(TASKS))
@click.option(
    "--app", "app_name", default=DEFAULT_APP_NAME, show_default=True, help="The application."
)
@click.option(
    "--address",
    help="Ray cluster address (default: $RAY_ADDRESS, else the cluster `ray start` runs here).",
)
@timeout_option(600)
def reload(task: str, app_name: str, address: str | None, timeout: float) -> None:
    """Load TASK's model again on every replica (after moving its alias, say).

    Each replica loads the new model beside the one it serves and swaps it in once warm:
    requests in flight finish on the old weights and none fails.
    """
    import ray
    from ray.serve.exceptions import RayServeException

    _check_reachable(address)
    try:
        ray.init(address=address or "auto", log_to_driver=False)
    except ConnectionError as error:
        # Ray reads its auth mode once, at import: the shell must say token mode itself.
        hint = (
            "; with token authentication, a Ray driver needs RAY_AUTH_MODE=token and the token"
            if os.environ.get("RAY_AUTH_MODE", "").lower() != "token"
            else ""
        )
        raise click.ClickException(f"cannot reach the Ray cluster: {error}{hint}") from None
    try:
        results = reload_task(task, app_name=app_name, timeout_s=timeout)
    except (RayServeException, KeyError, TimeoutError) as error:
        raise click.ClickException(f"cannot reload {app_name}/{task}: {error}") from None
    finally:
        ray.shutdown()
    failed = [result for result in results if isinstance(result, Exception)]
    for result in results:
        if isinstance(result, Exception):
            click.echo(f"{task}: a replica kept its previous model: {result}", err=True)
        else:
            click.echo(f"{task}: a replica now serves {result.model_version} ({result.reference})")
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} replicas failed to reload")
