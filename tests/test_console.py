"""What long-running commands show on the console: Ray's settings, and ``hdm serve up``'s wait."""

from __future__ import annotations

import logging

from hdm_platform.console import configure_logging, quiet_ray_options, route_ray_data_logs
from hdm_platform.serve.control import deploy_progress


def test_ray_forwards_worker_output_and_info_logs_only_when_verbose(monkeypatch):
    monkeypatch.delenv("HDM_VERBOSE", raising=False)
    assert quiet_ray_options() == {"log_to_driver": False, "logging_level": logging.WARNING}
    monkeypatch.setenv("HDM_VERBOSE", "1")
    assert quiet_ray_options() == {"log_to_driver": True, "logging_level": logging.INFO}


def test_ray_data_logs_go_to_the_log_file_and_to_the_console_only_when_verbose(monkeypatch, tmp_path):
    import ray.data  # noqa: F401  (configures the "ray.data" logger, with a console handler at INFO)

    monkeypatch.setenv("HDM_HOME", str(tmp_path))
    monkeypatch.delenv("HDM_VERBOSE", raising=False)
    library, progress = logging.getLogger("ray.data"), logging.getLogger("ray.data._internal.progress")
    before = list(library.handlers), list(logging.getLogger().handlers)
    try:
        log_file = configure_logging("test")
        route_ray_data_logs()
        route_ray_data_logs()  # a second run in one process routes nothing twice
        consoles = [h for h in library.handlers if type(h) is not logging.FileHandler and isinstance(h, logging.StreamHandler)]
        assert consoles and all(handler.level == logging.WARNING for handler in consoles)
        assert not progress.isEnabledFor(logging.WARNING)  # "progress bars disabled": we turn them off
        logging.getLogger("ray.data._internal.execution").info("Execution plan of Dataset d_0")
        logging.getLogger("ray.data._internal.execution").debug("scheduling loop")
        assert log_file.read_text().count("Execution plan of Dataset d_0") == 1
        assert "scheduling loop" not in log_file.read_text()

        monkeypatch.setenv("HDM_VERBOSE", "1")
        route_ray_data_logs()
        assert all(handler.level == logging.INFO for handler in consoles) and progress.isEnabledFor(logging.WARNING)
    finally:
        for logger, handlers in zip((library, logging.getLogger()), before, strict=True):
            for handler in set(logger.handlers) - set(handlers):
                logger.removeHandler(handler)
                handler.close()


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
