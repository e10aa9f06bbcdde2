"""``hdm local up|env|status|down``: the laptop's Ray head and MLflow server (see
:mod:`hdm_platform.local`)."""

from __future__ import annotations

import shlex
from collections.abc import Callable
from typing import Any

import click

from hdm_platform.config import local_home
from hdm_platform.local import Ports, ServiceError, environment, read_services, start_services, stop_services

__all__ = ["local"]

_DEFAULT_PORTS = Ports()


@click.group()
def local() -> None:
    """Start, show and stop the local Ray head and MLflow server under $HDM_HOME (./.hdm)."""


def _port(flag: str, variable: str, default: int, help: str) -> Callable[[Any], Any]:
    return click.option(flag, type=click.IntRange(1, 65535), default=default, envvar=variable,
                        show_default=True, show_envvar=True, help=help)  # fmt: skip


@local.command()
@_port("--ray-port", "HDM_RAY_PORT", _DEFAULT_PORTS.ray, "Ray's GCS port (what RAY_ADDRESS names).")
@_port("--dashboard-port", "HDM_DASHBOARD_PORT", _DEFAULT_PORTS.dashboard, "Ray dashboard, Jobs and Serve REST API.")
@_port("--ray-client-port", "HDM_RAY_CLIENT_PORT", _DEFAULT_PORTS.ray_client, "Ray Client server.")
@_port("--dashboard-agent-port", "HDM_DASHBOARD_AGENT_PORT", _DEFAULT_PORTS.dashboard_agent, "The head's dashboard agent.")
@_port("--mlflow-port", "HDM_MLFLOW_PORT", _DEFAULT_PORTS.mlflow, "MLflow tracking server and UI.")
@_port("--serve-port", "HDM_SERVE_PORT", _DEFAULT_PORTS.serve, "Serve's HTTP proxy (recorded for `hdm local env`).")
def up(
    ray_port: int,
    dashboard_port: int,
    ray_client_port: int,
    dashboard_agent_port: int,
    mlflow_port: int,
    serve_port: int,
) -> None:
    """Start the services, or reuse them when they already run; prints their URLs."""
    ports = Ports(
        ray=ray_port, dashboard=dashboard_port, ray_client=ray_client_port,
        dashboard_agent=dashboard_agent_port, mlflow=mlflow_port, serve=serve_port,
    )  # fmt: skip
    try:
        services, reused = start_services(local_home(), ports)
    except ServiceError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{'reusing' if reused else 'started'}: Ray head at {services.ray_address}, "
               f"MLflow at {services.mlflow_url}")  # fmt: skip
    click.echo(f"Ray dashboard: {services.dashboard_url}")
    click.echo(f"MLflow UI:     {services.mlflow_url}")
    click.echo("Point a shell at them with: eval \"$(hdm local env)\"")


@local.command(name="env")
def env_command() -> None:
    """Print `export` lines for the running services (for `eval "$(hdm local env)"`)."""
    services = read_services(local_home())
    if services is None:
        raise click.ClickException(f"no local services run for {local_home()}; start them with: hdm local up")
    for name, value in {**environment(services), "HDM_SERVE_PORT": str(services.ports.serve)}.items():
        click.echo(f"export {name}={shlex.quote(value)}")


@local.command()
def status() -> None:
    """Say whether the services run, and where."""
    services = read_services(local_home())
    if services is None:
        click.echo(f"not running (HDM_HOME {local_home()})")
        return
    click.echo(f"Ray head:      {services.ray_address} (pid {services.ray_pid}, dashboard {services.dashboard_url})")
    click.echo(f"MLflow server: {services.mlflow_url} (pid {services.mlflow_pid})")


@local.command()
def down() -> None:
    """Stop the services `hdm local up` started (and everything Ray ran on that head)."""
    stopped = stop_services(local_home())
    click.echo(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
