"""Shared by the serving tests: the digits data, a small registry of test models, a keyed HTTP client
and concurrent load. Ports, request bodies and the in-process fit live in tests/support.py."""

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import numpy as np
import requests
import torch
from sklearn.datasets import load_digits

from orchestrator.config import ModelConfig, PipelineConfig, to_config, to_dict
from orchestrator.registry import ModelRegistry, ModelVersion, signature_for
from orchestrator.training.models import build_model

MODEL = "digits"
INPUT_SHAPE = [1, 8, 8]


def digits() -> tuple:
    features, labels = load_digits(return_X_y=True)
    return (features / 16.0).astype(np.float32), labels.astype(np.int64)


def register(
    cfg: PipelineConfig, model: torch.nn.Module, *, name: str = MODEL, alias: Optional[str] = None, **lineage
) -> ModelVersion:
    registry = ModelRegistry(cfg.storage.root)
    version = registry.register(
        name, {k: v.detach().numpy() for k, v in model.state_dict().items()}, config=to_dict(cfg),
        signature=signature_for(INPUT_SHAPE, 10), lineage={"source": "serving tests", **lineage}, metrics={},
    )
    if alias:
        registry.set_alias(name, alias, version.version)
    return version


def register_user_model(cfg: PipelineConfig, target: str, **kwargs) -> ModelVersion:
    """A version of a test model from tests/integration/serving_models.py, untrained."""
    user_cfg = to_config(cfg, {"model": ModelConfig(_target_=target, kwargs=kwargs)})
    return register(user_cfg, build_model(user_cfg.model, INPUT_SHAPE, 10), kind=target)


def client(key: Optional[str]) -> requests.Session:
    session = requests.Session()
    if key:
        session.headers["Authorization"] = f"Bearer {key}"
    return session


def hammer(send: Callable[[int], requests.Response], total: int, clients: int = 8) -> List[requests.Response]:
    """`total` calls of `send(i)` from `clients` threads; the responses in order."""
    with ThreadPoolExecutor(max_workers=clients) as pool:
        return list(pool.map(send, range(total)))


def served_versions(responses: List[requests.Response]) -> Dict[str, int]:
    counts: Dict[str, int] = {}
    for response in responses:
        version = response.headers.get("X-Model-Version", "none")
        counts[version] = counts.get(version, 0) + 1
    return counts
