"""Fixtures shared by every test tier, and the order the tiers run in. Nothing here starts or imports Ray.

Tiers run fastest first: tests/unit (no Ray, seconds), then tests/integration (one local Ray for the
whole tier), then tests/e2e (jobs in their own processes). Markers say what a test costs:
`slow` starts clusters, runs jobs or long Ray runs; `faults` kills processes; `gpu` needs CUDA.
`pytest -m "not slow"` is the development loop (README: Testing).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import pytest
from omegaconf import DictConfig

from tests.support import REPO

CONF_DIR = REPO / "conf"
TIERS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    """Run the tiers in TIERS order and, inside a tier, the files with no slow test first.

    A file's tests stay together and in their collected order (a stable sort on a per-file key), so
    module-scoped fixtures are set up once. Integration's Ray lives in this process for that tier
    only; e2e jobs start Ray in their own processes: keeping the tiers apart keeps the two from
    ever running side by side."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (_tier(item), item.path in slow_files))


def _tier(item: pytest.Item) -> int:
    parts = item.path.relative_to(REPO / "tests").parts
    return TIERS.index(parts[0]) if len(parts) > 1 and parts[0] in TIERS else len(TIERS)


@pytest.fixture
def compose() -> Callable[[Sequence[str]], DictConfig]:
    """compose(overrides) -> the DictConfig a job would see for `conf/config.yaml` plus `overrides`."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from orchestrator.config import register_configs

    register_configs()  # conf/config.yaml extends the schema stored here

    def _compose(overrides: Sequence[str] = ()) -> DictConfig:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose("config", overrides=list(overrides))

    return _compose
