"""``hdm submit``: run a ``jobs/`` entry point on a Ray cluster through the Ray Jobs API.

The project checkout is the job's working directory, so the cluster runs the code and the
experiment configs you have here, not whatever version its nodes installed. ``hdm_model``
sits at the checkout's root (on the job's PYTHONPATH with the working directory);
``hdm_platform`` lives under ``platform/`` and ships as a ``py_modules`` entry.

Authentication: a Ray 2.60 head started with ``ray start --head`` turns token authentication
on when a token exists (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``),
but ``JobSubmissionClient`` only sends the token when ``RAY_AUTH_MODE=token`` is set in the
submitting shell, so a plain submission to such a head fails with HTTP 401. ``hdm submit``
therefore sends the token Ray would use whenever one is found, unless ``RAY_AUTH_MODE`` is
explicitly ``disabled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from hdm_platform.config import ConfigError, ExperimentConfig, load_config

__all__ = [
    "DEFAULT_ADDRESS",
    "JOB_ENTRY_POINTS",
    "JobEntryPoint",
    "PASSTHROUGH_ENV_VARS",
    "PLACEHOLDER_MARK",
    "WORKING_DIR_EXCLUDES",
    "auth_headers",
    "find_project_dir",
    "job_entrypoint",
    "job_runtime_env",
    "submit",
    "unset_placeholders",
]

DEFAULT_ADDRESS = "http://127.0.0.1:8265"


@dataclass(frozen=True, kw_only=True)
class JobEntryPoint:
    """A script under ``jobs/`` and what its job needs from the experiment and the cluster."""

    script: str
    # Config fields (dotted prefixes) the job reads: a placeholder left there is refused.
    reads: tuple[str, ...] = ("",)
    # Run the script itself on a GPU node when the experiment uses GPUs (evaluation runs in
    # the driver; training's driver only coordinates Ray Train workers).
    gpu_driver: bool = False


# `hdm submit <name>` exists for each entry.
JOB_ENTRY_POINTS: dict[str, JobEntryPoint] = {
    "train": JobEntryPoint(script="jobs/train.py"),
    "evaluate": JobEntryPoint(
        script="jobs/evaluate.py", reads=("data.", "mlflow.", "storage."), gpu_driver=True
    ),
}

# Local state, build output and caches never travel to the cluster (Ray caps a working
# directory at 500 MiB, and a virtual environment alone is gigabytes).
WORKING_DIR_EXCLUDES: list[str] = [
    ".venv",
    ".git",
    ".hdm",
    "bench/out",
    "build",
    "dist",
    "*.egg-info",
    "**/__pycache__",
    ".pytest_cache",
    "mlruns",
]

# Settings the job needs to reach the same tracking server and object store as this shell
# (and, on a local head, the same HDM_HOME for runs and the default MLflow store).
# Cluster nodes should get S3 access from an IAM instance profile; keys passed here are
# visible in the job's runtime environment on the dashboard.
PASSTHROUGH_ENV_VARS: tuple[str, ...] = (
    "HDM_HOME",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
)

# The experiment configs mark values the user must supply with this string.
PLACEHOLDER_MARK = "YOUR-BUCKET"

# Ray's client lets these override its `address` argument; an explicit --address must win.
_RAY_ADDRESS_ENV_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")



def _job_options(command: Any) -> Any:
    """The options every submitted job takes: where the job server is, whether to follow
    the logs, and which checkout to ship."""
    decorators = [
        click.option(
            "--address",
            # Ray's own precedence for the job server address (as in `ray job submit`).
            envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
            default=DEFAULT_ADDRESS,
            show_default=True,
            show_envvar=True,
            help="Ray dashboard (job server) URL.",
        ),
        click.option("--follow/--no-follow", default=False, help="Stream logs until the job ends."),
        click.option(
            "--project-dir",
            type=click.Path(exists=True, file_okay=False, path_type=Path),
            default=None,
            help="Checkout to ship as the working directory [default: found from the cwd].",
        ),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command

def find_project_dir(start: Path) -> Path:
    """The nearest directory at or above ``start`` holding ``pyproject.toml`` and ``jobs/``."""
    start = start.resolve()
    for candidate in (start, *start.parents):
        if (candidate / "pyproject.toml").is_file() and (candidate / "jobs").is_dir():
            return candidate
    raise click.UsageError(
        f"no HDM project checkout (pyproject.toml and jobs/) at or above {start}; "
        "run hdm submit inside the checkout or pass --project-dir"
    )


def job_runtime_env(project_dir: Path, environ: Mapping[str, str]) -> dict[str, Any]:
    """Ray runtime environment: the checkout as working directory plus passthrough settings."""
    env_vars = {name: environ[name] for name in PASSTHROUGH_ENV_VARS if environ.get(name)}
    return {
        "working_dir": str(project_dir),
        "py_modules": [str(project_dir / "platform" / "hdm_platform")],
        "excludes": list(WORKING_DIR_EXCLUDES),
        "env_vars": env_vars,
    }


def job_entrypoint(
    script: str, config: str, overrides: Sequence[str], extra_args: Sequence[str]
) -> str:
    """The shell command the cluster runs, e.g. ``python jobs/train.py --config ... --set ...``."""
    argv = ["python", script, "--config", config]
    for override in overrides:
        argv += ["--set", override]
    return shlex.join([*argv, *extra_args])


def auth_headers(environ: Mapping[str, str]) -> dict[str, str]:
    """``Authorization`` header carrying the token Ray itself would load, if there is one."""
    if environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return {}
    # Ray's own loader keeps the documented precedence (RAY_AUTH_TOKEN, then
    # RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token) and its error for an unreadable path.
    from ray._raylet import AuthenticationTokenLoader
    from ray.exceptions import AuthenticationError

    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # the loader caches per process; read the environment as it is now
    try:
        if not loader.has_token(ignore_auth_mode=True):
            return {}
        token = loader.get_raw_token(ignore_auth_mode=True)
    except AuthenticationError as error:
        raise click.ClickException(f"cannot read the Ray authentication token: {error}") from None
    return {"Authorization": f"Bearer {token}"}


def unset_placeholders(config: ExperimentConfig, reads: Sequence[str] = ("",)) -> list[str]:
    """Dotted names (under the ``reads`` prefixes) still holding the ``YOUR-BUCKET`` placeholder."""
    return [
        key
        for key, value in config.flat().items()
        if isinstance(value, str) and PLACEHOLDER_MARK in value and key.startswith(tuple(reads))
    ]


@contextlib.contextmanager
def _without_env(names: Sequence[str]) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _job_server_errors(address: str) -> Iterator[None]:
    from ray.exceptions import AuthenticationError

    try:
        yield
    except (ConnectionError, RuntimeError, AuthenticationError) as error:
        raise click.ClickException(f"Ray job server {address}: {error}") from None


def _connect(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    headers = auth_headers(os.environ)
    with _without_env(_RAY_ADDRESS_ENV_VARS):
        return JobSubmissionClient(address, headers=headers)


def _relative_config(config: str, project_dir: Path) -> str:
    """The config as the job will see it: a URI as given, a local file relative to the root."""
    if "://" in config:
        return config
    path = Path(config).resolve()
    if not path.is_relative_to(project_dir):
        raise click.BadParameter(
            f"{config} is outside the project {project_dir}, so the job would not see it; "
            "copy it under jobs/configs/ or upload it and pass its URI",
            param_hint="--config",
        )
    return path.relative_to(project_dir).as_posix()


def _follow(client: Any, job_id: str) -> Any:
    async def stream() -> None:
        async for lines in client.tail_job_logs(job_id):
            click.echo(lines, nl=False)

    try:
        asyncio.run(stream())
    except KeyboardInterrupt:
        click.echo(f"stopped following; job {job_id} keeps running (ray job stop {job_id})", err=True)
        raise click.exceptions.Exit(130) from None
    # The log stream can close a moment before the job's status turns terminal.
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(0.5)
    return status


def _job_command(name: str, entry: JobEntryPoint) -> click.Command:
    @click.command(
        name=name,
        help=(
            f"Run {entry.script} on a Ray cluster with this checkout as its working directory. "
            "Arguments after -- go to the script unchanged. Prints the job id; with --follow, "
            "streams the job's logs and exits non-zero unless the job succeeds."
        ),
    )
    @click.option(
        "--config",
        "config_path",
        required=True,
        help="Experiment YAML inside the checkout (e.g. jobs/configs/tiny-cpu.yaml) or a URI.",
    )
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override.")
    @_job_options
    @click.argument("extra_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- SCRIPT_ARGS...]")
    def command(
        config_path: str,
        overrides: tuple[str, ...],
        address: str,
        follow: bool,
        project_dir: Path | None,
        extra_args: tuple[str, ...],
    ) -> None:
        project = project_dir.resolve() if project_dir else find_project_dir(Path.cwd())
        job_config = _relative_config(config_path, project)
        try:
            # Fail here, before any cluster resource starts, on a typo or a bad value.
            config = load_config(config_path, overrides)
        except ConfigError as error:
            raise click.UsageError(str(error)) from None
        if placeholders := unset_placeholders(config, entry.reads):
            raise click.UsageError(
                f"{', '.join(placeholders)} still hold the {PLACEHOLDER_MARK} placeholder; "
                f"set them, e.g. --set {placeholders[0]}=s3://my-bucket/..."
            )

        _submit_job(
            address,
            follow,
            entrypoint=job_entrypoint(entry.script, job_config, overrides, extra_args),
            runtime_env=job_runtime_env(project, os.environ),
            entrypoint_num_gpus=1 if entry.gpu_driver and config.scaling.use_gpu else None,
            metadata={"hdm_job": name, "hdm_experiment": config.name},
        )

    return command


def _submit_job(address: str, follow: bool, **job: Any) -> None:
    """Submit, print the job id, and with ``follow`` stream its logs and fail unless it succeeds."""
    with _job_server_errors(address):
        client = _connect(address)
        job_id = client.submit_job(**job)
        click.echo(job_id)
        if not follow:
            click.echo(f"submitted; the dashboard at {address} shows its logs", err=True)
            return
        status = _follow(client, job_id)
        message = client.get_job_info(job_id).message
    click.echo(f"job {job_id} {status.value}", err=True)
    if status.value != "SUCCEEDED":
        raise click.ClickException(f"job {job_id} {status.value}: {message or 'no message'}")


@click.group(name="submit")
def submit() -> None:
    """Run an experiment's job on a Ray cluster through the Ray Jobs API."""


for _name, _entry in JOB_ENTRY_POINTS.items():
    submit.add_command(_job_command(_name, _entry))

_ENHANCE_SCRIPT = "jobs/enhance.py"


@submit.command(
    name="enhance",
    # Everything from the first argument on is hdm enhance's: SRC..., -o DEST, --checkpoint ...
    context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False},
)
@_job_options
@click.argument(
    "enhance_args", nargs=-1, required=True, type=click.UNPROCESSED, metavar="SRC... -o DEST [ENHANCE OPTIONS]"
)
def submit_enhance(address: str, follow: bool, project_dir: Path | None, enhance_args: tuple[str, ...]) -> None:
    """Run hdm enhance on Ray Data as a job on a Ray cluster (jobs/enhance.py).

    The options of this command come first; the rest is hdm enhance's, checked here before
    submitting. SRC and DEST should be URIs the cluster reaches (s3://...). Prints the job
    id; with --follow, streams the job's logs and exits non-zero unless it succeeds (a job
    in which any image failed fails).
    """
    from hdm_platform.cli.enhance import enhance

    project = project_dir.resolve() if project_dir else find_project_dir(Path.cwd())
    arguments = ["--ray", *enhance_args]
    # Parsed here (not run) so that a typo fails before the job does.
    enhance.make_context(_ENHANCE_SCRIPT, list(arguments))
    _submit_job(
        address,
        follow,
        entrypoint=shlex.join(["python", _ENHANCE_SCRIPT, *arguments]),
        runtime_env=job_runtime_env(project, os.environ),
        metadata={"hdm_job": "enhance"},
    )
