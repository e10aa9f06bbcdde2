"""What long-running commands show on the console: Ray's settings, and ``hdm serve up``'s wait."""

from __future__ import annotations

import logging

import pytest

from hdm_platform import console
from hdm_platform.console import configure_logging, quiet_ray_options, ray_init_options, route_ray_data_logs
from hdm_platform.serve.control import deploy_progress


def test_ray_forwards_worker_output_and_info_logs_only_when_verbose(monkeypatch):
    monkeypatch.delenv("HDM_VERBOSE", raising=False)
    assert quiet_ray_options() == {"log_to_driver": False, "logging_level": logging.WARNING}
    monkeypatch.setenv("HDM_VERBOSE", "1")
    assert quiet_ray_options() == {"log_to_driver": True, "logging_level": logging.INFO}


@pytest.fixture
def restored_logging():
    """Every logger's level and handlers, and every handler's level, as they were before."""

    def loggers() -> list[logging.Logger]:
        found = logging.root.manager.loggerDict.values()
        return [logging.getLogger(), *(logger for logger in found if isinstance(logger, logging.Logger))]

    saved = {logger: (list(logger.handlers), logger.level) for logger in loggers()}
    handler_levels = {handler: handler.level for handlers, _ in saved.values() for handler in handlers}
    yield
    for logger in loggers():
        handlers, level = saved.get(logger, ([], logging.NOTSET))
        for handler in set(logger.handlers) - set(handlers):
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(level)
    for handler, level in handler_levels.items():
        handler.setLevel(level)


def test_ray_data_logs_go_to_the_log_file_and_to_the_console_only_when_verbose(monkeypatch, tmp_path, restored_logging):
    import ray.data  # noqa: F401  (configures the "ray.data" logger, with a console handler at INFO)

    monkeypatch.setenv("HDM_HOME", str(tmp_path))
    monkeypatch.delenv("HDM_VERBOSE", raising=False)
    monkeypatch.setattr(console, "_log_file", None)  # this process's command log, put back afterwards
    library, progress = logging.getLogger("ray.data"), logging.getLogger("ray.data._internal.progress")
    log_file = configure_logging("test")
    route_ray_data_logs()
    route_ray_data_logs()  # a second run in one process routes nothing twice
    consoles = [h for h in library.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    assert consoles and all(handler.level == logging.WARNING for handler in consoles)
    assert not progress.isEnabledFor(logging.WARNING)  # "progress bars disabled": we turn them off
    logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset d_0")
    logging.getLogger("ray.data._internal.execution").debug("scheduling loop")
    assert log_file.read_text().count("Execution plan of Dataset d_0") == 1
    assert "scheduling loop" not in log_file.read_text()

    monkeypatch.setenv("HDM_VERBOSE", "1")
    route_ray_data_logs()
    assert all(handler.level == logging.INFO for handler in consoles) and progress.isEnabledFor(logging.WARNING)


def test_serve_up_progress_names_each_application_and_its_running_replicas():
    applications = {
        "hdm": {
            "status": "DEPLOYING",
            "deployments": {
                "ingress": {"target_num_replicas": 1, "replicas": [{"state": "RUNNING"}]},
                "dehaze": {"target_num_replicas": 2, "replicas": [{"state": "RUNNING"}, {"state": "STARTING"}]},
            },
        },
        "strict": {"status": "RUNNING", "deployments": {}},
    }
    assert deploy_progress(["hdm", "strict", "later"], applications) == (
        "hdm DEPLOYING (ingress 1/1, dehaze 1/2); strict RUNNING; later NOT_STARTED"
    )


def test_a_local_ray_gets_its_cpus_and_a_cluster_at_ray_address_none(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_init_options(local_cpus=3) == {**quiet_ray_options(), "num_cpus": 3}
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_init_options(local_cpus=3) == quiet_ray_options()


def test_ray_datas_false_no_cpu_warning_stays_off_the_console_but_in_the_log_file(monkeypatch, tmp_path, restored_logging):
    import ray.data  # noqa: F401

    monkeypatch.setenv("HDM_HOME", str(tmp_path))
    monkeypatch.delenv("HDM_VERBOSE", raising=False)
    monkeypatch.setattr(console, "_log_file", None)
    log_file = configure_logging("test")
    route_ray_data_logs()
    library = logging.getLogger("ray.data")
    consoles = [h for h in library.handlers if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    false_alarm = "Warning: The Ray cluster currently does not have any available CPUs. The Dataset job will hang"

    def record(message: str) -> logging.LogRecord:
        return logging.makeLogRecord({"name": "ray.data.dataset", "levelno": logging.WARNING, "levelname": "WARNING", "msg": message})

    assert consoles and not any(handler.filter(record(false_alarm)) for handler in consoles)
    assert all(handler.filter(record("shard s-7 failed to read")) for handler in consoles)  # other warnings show
    logging.getLogger("ray.data.dataset").warning(false_alarm)
    assert false_alarm in log_file.read_text()

    monkeypatch.setenv("HDM_VERBOSE", "1")  # -v shows everything
    route_ray_data_logs()
    assert all(handler.filter(record(false_alarm)) for handler in consoles)
