"""Deploy, inspect, reload and remove Serve applications: what ``hdm serve`` runs.

``up``, ``status`` and ``down`` talk to the dashboard's Serve REST API (what ``serve
deploy``, ``serve status`` and ``serve shutdown`` use), so they need only the dashboard
address and, with token authentication, the token. A config is Serve's declarative
desired state: deploying one replaces every application on the cluster with the
config's. ``reload`` runs inside the cluster (a Ray driver) and asks every replica of a
task's deployment, through its deployment handle, to load its model again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from hdm_platform.config import ConfigError, apply_overrides, parse_overrides, read_yaml_mapping, validation_message
from hdm_platform.serve.settings import ModelSettings, ServeAppArgs

__all__ = [
    "APP_IMPORT_PATHS",
    "DeployFailedError",
    "deploy",
    "deploy_progress",
    "read_serve_config",
    "reload_task",
    "remove_application",
    "serve_client",
    "serve_details",
    "validate_serve_config",
    "wait_until_removed",
    "wait_until_running",
]

#: The builder every config in ``serve_configs/`` names, and the default application
#: ``serve build`` writes a config for.
APP_IMPORT_PATHS = ("hdm_platform.serve.app:build_app", "hdm_platform.serve.app:app")
_INGRESS = "ingress"  # the ingress deployment's name (``app.INGRESS_DEPLOYMENT``)


class DeployFailedError(RuntimeError):
    """An application that Serve could not deploy; the message carries Serve's reason."""


def _check_hdm_application(app: Any, *, source: str, where: str) -> None:
    args = ServeAppArgs.parse(app.args or {}, source=source, field=f"{where}.args")
    names = {_INGRESS, *args.tasks}
    for position, deployment in enumerate(app.deployments):
        field = f"{where}.deployments[{position}]"
        if deployment.name not in names:
            raise ConfigError(
                f"invalid {source}:\n  {field}.name: this application has no deployment "
                f"{deployment.name!r}; it has {', '.join(sorted(names))}"
            )
        if deployment.name == _INGRESS:
            continue
        settings = args.tasks[deployment.name]
        if "user_config" in deployment.model_fields_set:
            try:
                settings = ModelSettings.model_validate(deployment.user_config)
            except ValidationError as error:
                message = validation_message(error, source=source, field=f"{field}.user_config")
                raise ConfigError(message) from None
        if (
            "max_ongoing_requests" in deployment.model_fields_set
            and deployment.max_ongoing_requests < settings.max_batch_size
        ):
            raise ConfigError(
                f"invalid {source}:\n  {field}.max_ongoing_requests: "
                f"{deployment.max_ongoing_requests} cannot fill a batch of max_batch_size "
                f"{settings.max_batch_size}; use at least that (twice it keeps the next batch "
                "filling while one runs)"
            )


def validate_serve_config(raw: Any, *, source: str = "serve config") -> Any:
    """``raw`` as Serve's ``ServeDeploySchema``, with the HDM applications' ``args``,
    ``user_config`` overrides and batch sizes checked; ``ConfigError`` names the field."""
    from ray.serve.schema import ServeDeploySchema

    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(validation_message(error, source=source)) from None
    for position, app in enumerate(config.applications):
        if app.import_path in APP_IMPORT_PATHS:
            _check_hdm_application(app, source=source, where=f"applications[{position}]")
    return config


def read_serve_config(path: str | Path, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """A Serve config file with ``--set``-style ``overrides`` applied (``http_options.port=8123``),
    validated (:func:`validate_serve_config`), as its mapping."""
    raw = read_yaml_mapping(str(path), "serve config")
    apply_overrides(raw, parse_overrides(overrides))
    validate_serve_config(raw, source=str(path))
    return raw


def serve_client(address: str, headers: Mapping[str, str]) -> Any:
    """A client of the Serve REST API at the dashboard ``address`` (``http://host:8265``)."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    return ServeSubmissionClient(address, headers=dict(headers))


def deploy(config: Mapping[str, Any], *, address: str, headers: Mapping[str, str]) -> None:
    """Make ``config`` the cluster's Serve state (returns once Serve accepted it)."""
    serve_client(address, headers).deploy_applications(dict(config))


def serve_details(*, address: str, headers: Mapping[str, str]) -> dict[str, Any]:
    """Serve's view of the cluster: proxies, HTTP options, applications and their replicas."""
    return serve_client(address, headers).get_serve_details()


def wait_until_running(
    names: list[str],
    *,
    address: str,
    headers: Mapping[str, str],
    timeout_s: float,
    poll_s: float = 2.0,
    on_progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Poll until every application in ``names`` is RUNNING; their details.

    ``on_progress`` gets a one-line state of the applications (:func:`deploy_progress`)
    whenever it changes. Raises ``DeployFailedError`` as soon as one fails,
    ``TimeoutError`` after ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    shown = None
    while True:
        applications = serve_details(address=address, headers=headers).get("applications", {})
        if on_progress is not None and (line := deploy_progress(names, applications)) != shown:
            on_progress(line)
            shown = line
        for name in names:
            status = applications.get(name, {}).get("status")
            if status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise DeployFailedError(
                    f"application {name} is {status}: {applications[name].get('message')}"
                )
        if all(applications.get(name, {}).get("status") == "RUNNING" for name in names):
            return {name: applications[name] for name in names}
        if time.monotonic() > deadline:
            waiting = {
                name: applications.get(name, {}).get("status", "NOT_STARTED") for name in names
            }
            raise TimeoutError(f"applications not RUNNING after {timeout_s:g} s: {waiting}")
        time.sleep(poll_s)


def deploy_progress(names: Iterable[str], applications: Mapping[str, Any]) -> str:
    """One line: each application's status and its deployments' running replicas, e.g.
    ``hdm DEPLOYING (ingress 1/1, dehaze 0/2)``."""
    parts = []
    for name in names:
        app = applications.get(name, {})
        deployments = ", ".join(
            f"{deployment_name} "
            f"{sum(replica['state'] == 'RUNNING' for replica in deployment.get('replicas', []))}"
            f"/{deployment.get('target_num_replicas', '?')}"
            for deployment_name, deployment in app.get("deployments", {}).items()
        )
        parts.append(f"{name} {app.get('status', 'NOT_STARTED')}" + (f" ({deployments})" if deployments else ""))
    return "; ".join(parts)


def wait_until_removed(
    name: str | None,
    *,
    address: str,
    headers: Mapping[str, str],
    timeout_s: float,
    poll_s: float = 1.0,
) -> None:
    """Poll until application ``name`` (or, for None, every application) is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        applications = serve_details(address=address, headers=headers).get("applications", {})
        if (name not in applications) if name else not applications:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"still there after {timeout_s:g} s: {', '.join(sorted(applications))}"
            )
        time.sleep(poll_s)


def remove_application(name: str | None, *, address: str, headers: Mapping[str, str]) -> None:
    """Remove application ``name``, or all of them (and Serve) when ``name`` is None.

    One application goes by deploying the others' current configs again, unchanged.
    """
    client = serve_client(address, headers)
    if name is None:
        client.delete_applications()
        return
    details = client.get_serve_details()
    applications = details.get("applications", {})
    if name not in applications:
        raise ValueError(
            f"no application {name!r}; running: {', '.join(sorted(applications)) or 'none'}"
        )
    remaining = {
        other: app["deployed_app_config"] for other, app in applications.items() if other != name
    }
    imperative = sorted(other for other, config in remaining.items() if config is None)
    if imperative:
        raise ValueError(
            f"cannot keep {', '.join(imperative)} while removing {name}: they were started "
            "by serve.run, not from a config"
        )
    if not remaining:
        client.delete_applications()
        return
    client.deploy_applications(
        {
            "proxy_location": details["proxy_location"],
            "http_options": details["http_options"],
            "applications": list(remaining.values()),
        }
    )


def reload_task(task: str, *, app_name: str, timeout_s: float = 600.0) -> list[Any]:
    """Ask every replica of ``task``'s deployment to load its model again (Ray must be
    initialised). One entry per replica: its new ``ModelInfo``, or the exception it raised
    (that replica keeps serving its previous model)."""
    from ray import serve

    handle = serve.get_deployment_handle(task, app_name=app_name)
    # broadcast: every replica, not one picked by the router as .remote() would.
    return handle.broadcast("reload").results(timeout_s=timeout_s, return_exceptions=True)
