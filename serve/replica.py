"""Model replicas: autoscaled, dynamically batched, shared by every model and version
(`serve.multiplexed`, model id "<name>:<version>"), each version built on the object-store weights."""

import asyncio
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List

import numpy as np
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from orchestrator.registry.servable import build_servable
from serve.metrics import BatchMetrics
from serve.names import MODEL_DEPLOYMENT, split_model_id


@dataclass(frozen=True)
class LoadedModel:
    """One version as a replica runs it."""

    model: str
    version: int
    forward: Callable[[torch.Tensor], torch.Tensor]
    arrays: Dict[str, np.ndarray]
    """Read-only views into the object store (kept alive as long as the model is loaded)."""
    ref_hex: str


@serve.deployment(name=MODEL_DEPLOYMENT)
class ModelServer:
    """A replica shared by every model and version: loads versions on demand (LRU, at most
    `max_models`), each built by `build_servable` on the shared object-store weights."""

    def __init__(self, controller: DeploymentHandle, *, batching: bool, max_batch_size: int,
                 batch_wait_timeout_s: float, max_models: int):
        torch.set_num_threads(1)  # replicas share the node's cores; intra-op threads would fight
        self._controller = controller
        self._batching = batching
        self._metrics = BatchMetrics()

        async def load_model(mid: str) -> LoadedModel:
            return await self._load(mid)

        # Wrapped here, not decorated on the class, so the LRU size comes from the config.
        self.load_model = serve.multiplexed(max_num_models_per_replica=max_models)(load_model)
        # @serve.batch adds these setters at runtime; its annotations keep the plain method's type.
        self._predict_batch.set_max_batch_size(max_batch_size)  # type: ignore[attr-defined]
        self._predict_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)  # type: ignore[attr-defined]

    async def _load(self, mid: str) -> LoadedModel:
        model, version = split_model_id(mid)
        info = await self._controller.weights.remote(model, version)
        arrays = await info["ref"]  # read-only numpy views into the node's object store
        return LoadedModel(model, version, build_servable(info["manifest"], arrays), arrays, info["ref"].hex())

    async def predict(self, rows: np.ndarray) -> Dict[str, np.ndarray]:
        """Rows [n, F] of the multiplexed model -> {"probabilities": [n, C], "label": [n]}."""
        if self._batching:
            return await self._predict_batch(rows)
        return (await self._run([rows]))[0]

    @serve.batch
    async def _predict_batch(self, batches: List[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        # Serve splits batches by multiplexed model id: every request here is for one version.
        return await self._run(batches)

    async def _run(self, batches: List[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        loaded = await self.load_model(serve.get_multiplexed_model_id())
        x = torch.from_numpy(np.concatenate(batches))
        with torch.inference_mode():
            logits = loaded.forward(x)
        probabilities = torch.softmax(logits, dim=1).numpy()
        self._metrics.record(loaded.model, loaded.version, len(batches))
        splits = np.cumsum([len(rows) for rows in batches])[:-1]
        return [{"probabilities": p, "label": p.argmax(axis=1)} for p in np.split(probabilities, splits)]

    def is_ready(self) -> bool:
        return True

    async def weights_info(self, hold_s: float = 0.0) -> Dict[str, Any]:
        """Which object-store copy this replica runs the multiplexed model on, to show sharing.
        `hold_s` keeps the call in flight, so a burst of calls fills a replica and reaches the others."""
        loaded = await self.load_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(hold_s)
        first = next(iter(loaded.arrays.values()))
        replica = serve.get_replica_context().replica_id.unique_id
        return {"object_ref": loaded.ref_hex, "writeable": bool(first.flags.writeable), "version": loaded.version,
                "replica": replica, "pid": os.getpid()}
