"""cluster.yaml: a valid Ray cluster-launcher config whose image matches the pinned Ray."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_cluster_yaml_passes_rays_schema(cluster):
    jsonschema.validate(cluster, json.loads(RAY_SCHEMA.read_text()))


def test_cluster_yaml_passes_the_cross_field_checks_of_ray_up(cluster):
    # What `ray up` checks beyond the schema (ray.autoscaler's validate_config, not a
    # public API): the head type is declared, and worker bounds are consistent.
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    for name, node_type in node_types.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", cluster["max_workers"])
        assert 0 <= low <= high <= cluster["max_workers"], name
        assert "node_config" in node_type and "resources" in node_type, name


def test_schema_check_catches_a_misspelled_key(cluster):
    # Guards the test above against a schema that accepts anything.
    broken = {**cluster, "head_node": cluster["head_node_type"]}
    with pytest.raises(jsonschema.ValidationError, match="head_node"):
        jsonschema.validate(broken, json.loads(RAY_SCHEMA.read_text()))


def test_images_match_the_installed_ray(cluster):
    docker = cluster["docker"]
    images = [docker[key] for key in ("image", "head_image", "worker_image") if key in docker]
    assert images, "cluster.yaml names no docker image"
    for image in images:
        match = re.fullmatch(r"rayproject/ray:(?P<version>[\d.]+)-py311(-(cpu|gpu|cu\d+))?", image)
        assert match, f"{image} is not a rayproject/ray py311 image"
        assert match["version"] == ray.__version__


def test_node_types_are_consistent(cluster):
    node_types = cluster["available_node_types"]
    assert cluster["head_node_type"] in node_types
    head = node_types[cluster["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is meant to be CPU-only"
    workers = {name: spec for name, spec in node_types.items() if name != cluster["head_node_type"]}
    gpu_counts = sorted(spec["resources"]["GPU"] for spec in workers.values())
    assert gpu_counts[0] == 1 and gpu_counts[-1] == 8
    for name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"] <= cluster["max_workers"], name
        assert spec["node_config"]["InstanceType"]


def test_nodes_install_the_project_and_share_mlflow_and_auth(cluster):
    mounted = cluster["file_mounts"]
    project_mount = next(remote for remote, local in mounted.items() if local == ".")
    assert any("pip install" in cmd and project_mount in cmd for cmd in cluster["setup_commands"])
    assert any("auth_token" in remote for remote in mounted)
    assert ".venv" in cluster["rsync_exclude"]

    head_start = " ".join(cluster["head_start_ray_commands"])
    worker_start = " ".join(cluster["worker_start_ray_commands"])
    assert "mlflow server" in head_start and "--artifacts-destination s3://" in head_start
    # No MLflow server jobs (a dozen idle consumer processes) on the head beside Ray.
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in head_start
    for commands in (head_start, worker_start):
        assert "RAY_AUTH_MODE=token" in commands
        assert "MLFLOW_TRACKING_URI=http://" in commands
    assert "$RAY_HEAD_IP:5000" in worker_start


def test_no_secrets_in_cluster_yaml():
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AKIA[0-9A-Z]{16}", text)
    assert "AWS_SECRET_ACCESS_KEY" not in text
