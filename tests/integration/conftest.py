"""Shared fixtures of the integration tier: one real local Ray for the whole test session."""

import os
from pathlib import Path

import pytest

from orchestrator.config.schema import PipelineConfig
from orchestrator.flows import connected

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """An embedded local Ray started the way jobs start it (`ensure_ray`), shut down at the end.

    Started once per process: restarting Ray in one process can segfault it at exit
    (ray-project/ray#31145). The e2e tier, which starts Ray in its jobs' own processes, sorts
    before this tier, so the two never run side by side. Ray's workers inherit the environment
    of ray.init, so the S3 server's variables must be set first (tests/integration/test_s3.py).
    """
    # Ray workers import test-only models by name (model._target_): make the repo importable for them.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    with connected(PipelineConfig()):
        yield
