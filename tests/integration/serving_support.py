"""Shared by the serving tests: a small trained registry, request bodies, a keyed HTTP client."""

import socket
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional

import numpy as np
import requests
import torch
from sklearn.datasets import load_digits

from orchestrator.config.schema import ModelConfig, PipelineConfig, to_dict, with_overrides
from orchestrator.training.models import build_model
from orchestrator.registry.store import ModelRegistry, ModelVersion, signature_for

MODEL = "digits"
INPUT_SHAPE = [1, 8, 8]


def free_port() -> int:
    """A free TCP port on loopback outside Ray's worker port range (10002-19999)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port
    raise RuntimeError("no free port outside 10002-19999")


def digits() -> tuple:
    features, labels = load_digits(return_X_y=True)
    return (features / 16.0).astype(np.float32), labels.astype(np.int64)


def fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, steps: int = 300) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~1 s of CPU; more threads only spin on a busy small machine
    try:
        for _ in range(steps):  # full batch: about 90% accurate on held-out rows
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)


def register(cfg: PipelineConfig, model: torch.nn.Module, *, name: str = MODEL, alias: Optional[str] = None, **lineage) -> ModelVersion:
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
    user_cfg = with_overrides(cfg, {"model": ModelConfig(_target_=target, kwargs=kwargs)})
    return register(user_cfg, build_model(user_cfg.model, INPUT_SHAPE, 10), kind=target)


def infer_body(rows: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}], **extra}


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
