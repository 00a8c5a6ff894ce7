"""Shared fixtures of the integration tier: one real local Ray, and one S3-compatible server, for
the whole tier."""

import os
from typing import Iterator

import pytest

from orchestrator.config import PipelineConfig
from orchestrator.flows import connected
from tests.s3_server import S3Server, running_s3_server
from tests.support import REPO


@pytest.fixture(scope="package")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server (moto) on loopback with one bucket, for this tier.

    Its AWS_* variables are in os.environ from the first use until the tier ends: they reach this
    process, job subprocesses and the Ray started afterwards (`ray_cluster` depends on this fixture).
    """
    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="package")
def ray_cluster(s3_server):
    """An embedded local Ray started the way jobs start it (`ensure_ray`), shut down when the tier ends.

    Started once per process: restarting Ray in one process can segfault it at exit
    (ray-project/ray#31145), so every integration test shares this one. The e2e tier, whose jobs
    start Ray in their own processes, runs after this tier (tests/conftest.py) and after this Ray
    has shut down, so the two never run side by side. Ray's workers inherit the environment of
    ray.init, so the S3 server's variables must be set first (tests/integration/test_s3.py).
    """
    # Ray workers import test-only models by name (model._target_): make the repo importable for them.
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), before]))
    try:
        with connected(PipelineConfig()):
            yield
    finally:  # the e2e tier's subprocesses see the environment they would see alone
        if before is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = before
