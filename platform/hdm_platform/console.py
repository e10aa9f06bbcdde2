"""What a command shows on the console, and where everything else goes.

By default a long-running command (``hdm train``, ``hdm tune``, ``hdm serve up``) shows its
own progress and the warnings a user can act on; Ray's, MLflow's and the platform's logs
go to a log file under ``HDM_HOME/logs`` whose path the command prints. ``hdm -v`` (which
sets ``HDM_VERBOSE=1`` for everything the command starts) shows them on the console too,
with Ray's per-worker output and Ray Data's progress bars.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from hdm_platform.config import local_home

__all__ = [
    "VERBOSE_VARIABLE",
    "configure_logging",
    "is_verbose",
    "quiet_ray_options",
    "ray_init_options",
    "route_ray_data_logs",
]

VERBOSE_VARIABLE = "HDM_VERBOSE"
_QUIET_LIBRARIES = ("ray", "mlflow", "alembic", "urllib3", "botocore", "filelock")
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The log file of this process's command, once :func:`configure_logging` has chosen it.
_log_file: Path | None = None


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_VARIABLE, "") not in ("", "0")


def quiet_ray_options() -> dict[str, bool | int]:
    """``ray.init`` settings for a driver that shows its own progress: the workers' output
    and Ray's INFO logs reach the console only with ``-v`` (they are in Ray's log files)."""
    return {"log_to_driver": is_verbose(), "logging_level": _console_level()}


def ray_init_options(*, local_cpus: int) -> dict[str, bool | int]:
    """``ray.init`` settings for a command's driver: :func:`quiet_ray_options`, and
    ``local_cpus`` logical CPUs for a local Ray (none for the cluster at ``RAY_ADDRESS``).
    Token authentication stays as Ray sets it: on for a new local Ray."""
    quiet = quiet_ray_options()
    if os.environ.get("RAY_ADDRESS"):
        return quiet
    return {**quiet, "num_cpus": local_cpus}


def configure_logging(command: str) -> Path:
    """Send every log record to ``HDM_HOME/logs/<command>-<time>.log`` and, unless verbose,
    only warnings of the libraries to the console; returns the log file's path."""
    global _log_file
    logs = local_home() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    path = logs / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    _log_file = path
    file_handler = logging.FileHandler(path)
    file_handler.setFormatter(logging.Formatter(_FORMAT))
    root = logging.getLogger()
    root.addHandler(file_handler)
    root.setLevel(logging.INFO)
    for name in _QUIET_LIBRARIES:
        library = logging.getLogger(name)
        library.setLevel(logging.INFO)
        library.addHandler(file_handler)
        _quiet_console_handlers(library)
    return path


def route_ray_data_logs() -> None:
    """Route the ``ray.data`` logger like the other libraries' (call after importing Ray Data).

    Ray Data configures that logger itself when imported, at DEBUG, not propagating, with a
    console handler at INFO: a dataset the driver materialises printed its execution plan."""
    library = logging.getLogger("ray.data")
    routed = {handler.baseFilename for handler in library.handlers if isinstance(handler, logging.FileHandler)}
    if _log_file is not None and os.path.abspath(_log_file) not in routed:
        info_to_log_file = logging.FileHandler(_log_file)
        info_to_log_file.setLevel(logging.INFO)  # its DEBUG records stay in Ray's ray-data.log
        info_to_log_file.setFormatter(logging.Formatter(_FORMAT))
        library.addHandler(info_to_log_file)
    _quiet_console_handlers(library)
    for handler in _console_handlers(library):
        if is_verbose():
            handler.removeFilter(_hide_materialize_cpu_warning)
        else:
            handler.addFilter(_hide_materialize_cpu_warning)
    # The commands turn Ray Data's progress bars off on purpose (they show their own), and
    # Ray Data warns once that they are off.
    logging.getLogger("ray.data._internal.progress").setLevel(logging.INFO if is_verbose() else logging.ERROR)


def _hide_materialize_cpu_warning(record: logging.LogRecord) -> bool:
    """False for Ray Data's "no available CPUs ... the Dataset job will hang" warning.

    ``Dataset.materialize`` executes its result once more to fill its cache, and that checks
    ``ray.available_resources()`` while the read tasks it has just finished still hold their
    CPUs: on a local Ray sized for the training workers and one CPU for the input pipeline,
    ``hdm train`` printed it on every run, and nothing hangs. It stays in the log file.
    """
    return "does not have any available CPUs" not in record.getMessage()


def _console_handlers(library: logging.Logger) -> list[logging.Handler]:
    return [
        handler
        for handler in library.handlers
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
    ]


def _quiet_console_handlers(library: logging.Logger) -> None:
    for handler in _console_handlers(library):
        handler.setLevel(_console_level())


def _console_level() -> int:
    return logging.INFO if is_verbose() else logging.WARNING
