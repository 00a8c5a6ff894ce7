"""Fixtures shared by every test tier. Nothing here starts or imports Ray."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import pytest
from omegaconf import DictConfig

from tests.s3_server import S3Server, running_s3_server

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"


@pytest.fixture
def compose() -> Callable[[Sequence[str]], DictConfig]:
    """compose(overrides) -> the DictConfig a job would see for `conf/config.yaml` plus `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from orchestrator.config.schema import register_configs

    register_configs()  # conf/config.yaml extends the schema stored here

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    return _compose


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3-compatible server (moto) on loopback with one bucket, for the whole session.

    Its AWS_* variables are in os.environ from the first use on: they reach this process, job
    subprocesses and a Ray started afterwards (integration's `ray_cluster` depends on this fixture).
    """
    with running_s3_server() as server:
        yield server
