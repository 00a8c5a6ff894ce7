"""Shared fixtures of the integration tier: a real local Ray per test module."""

import os
from pathlib import Path

import pytest

from orchestrator.config import PipelineConfig
from orchestrator.pipeline import connected

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_cluster():
    """An embedded local Ray started the way jobs start it (`ensure_ray`), shut down after the module.

    Per module rather than per session so no Ray outlives the integration tier: the e2e jobs
    start their own embedded Ray, and two local Ray instances on one machine confuse each other.
    """
    # Ray workers import test-only models by name (model._target_): make the repo importable for them.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with connected(PipelineConfig()):
        yield
