"""What long-running commands show on the console: Ray's settings, and ``hdm serve up``'s wait."""

from __future__ import annotations

import logging

from hdm_platform.console import quiet_ray_options
from hdm_platform.serve.control import deploy_progress


def test_ray_forwards_worker_output_and_info_logs_only_when_verbose(monkeypatch):
    monkeypatch.delenv("HDM_VERBOSE", raising=False)
    assert quiet_ray_options() == {"log_to_driver": False, "logging_level": logging.WARNING}
    monkeypatch.setenv("HDM_VERBOSE", "1")
    assert quiet_ray_options() == {"log_to_driver": True, "logging_level": logging.INFO}


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
