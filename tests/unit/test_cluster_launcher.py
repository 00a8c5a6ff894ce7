"""cluster/aws.yaml against Ray's own cluster-launcher schema and checks (what `ray up` runs before it
calls AWS), and in step with the rest of the repository. Imports Ray's autoscaler; starts nothing."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.config import ExportConfig

REPO = Path(__file__).resolve().parents[2]
RAY_PACKAGE = Path(importlib.util.find_spec("ray").origin).parent  # type: ignore[arg-type]  # ray is installed
RAY_SCHEMA = RAY_PACKAGE / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text())


@pytest.fixture(scope="module")
def schema_errors():
    validator = jsonschema.Draft7Validator(json.loads(RAY_SCHEMA.read_text()))
    return lambda config: [error.message for error in validator.iter_errors(config)]


def test_aws_yaml_matches_rays_cluster_launcher_schema(launcher, schema_errors):
    assert schema_errors(launcher) == []


def test_ray_up_fills_in_the_aws_defaults_and_accepts_the_result(launcher):
    # What `ray up` itself runs on a config; Ray has no public API for it.
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(launcher)  # the schema plus Ray's own checks (head type listed, min <= max workers)
    prepared = prepare_config(copy.deepcopy(launcher))
    validate_config(prepared)
    assert set(prepared["available_node_types"]) == {"ray.head.default", "ray.worker.cpu"}
    worker = prepared["available_node_types"]["ray.worker.cpu"]
    assert (worker["min_workers"], worker["max_workers"]) == (0, 4)
    assert prepared["available_node_types"]["ray.head.default"]["max_workers"] == 0


def test_token_auth_is_on_and_the_dashboard_stays_on_loopback(launcher):
    assert "--env RAY_AUTH_MODE=token" in launcher["docker"]["run_options"]
    assert launcher["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"  # one token on every node
    head_start = " ".join(launcher["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "dashboard-host=0.0.0.0" not in head_start


def test_it_installs_this_project_as_scripts_setup_sh_and_the_dockerfile_do(launcher):
    def torch_pin(text: str) -> str:
        (pin,) = set(re.findall(r"torch==([0-9.]+)", text))
        return pin

    setup = "\n".join(launcher["setup_commands"])
    assert torch_pin(setup) == torch_pin((REPO / "scripts" / "setup.sh").read_text())
    assert 'pip install --quiet -e ".[s3]"' in setup and launcher["file_mounts"]["~/orchestrator"] == "."
    dockerfile = (REPO / "cluster" / "kuberay" / "Dockerfile").read_text()
    assert torch_pin(dockerfile) == torch_pin(setup)
    # One Ray image everywhere: the launcher's container, the Dockerfile's base and the export's default.
    assert f"ARG RAY_IMAGE={launcher['docker']['image']}\n" in dockerfile
    assert launcher["docker"]["image"] == ExportConfig().image


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (["max_workers"], "four", "'four' is not of type 'integer'"),
        (["worker_nodes_typo"], {}, "('worker_nodes_typo' was unexpected)"),
        (["docker", "run_option"], [], "('run_option' was unexpected)"),
        (["available_node_types", "ray.worker.cpu", "node_config"], None, "'node_config' is a required property"),
        (["available_node_types", "ray.worker.cpu", "resources"], {"CPU": -1}, "-1 is less than the minimum of 0"),
        (["auth", "ssh_user"], 7, "7 is not of type 'string'"),
    ],
)
def test_the_schema_catches_a_broken_launcher_config(launcher, schema_errors, path, value, message):
    broken = copy.deepcopy(launcher)
    node = broken
    for key in path[:-1]:
        node = node[key]
    if value is None:
        del node[path[-1]]
    else:
        node[path[-1]] = value

    assert message in " | ".join(schema_errors(broken))
