"""The versions a serving replica has loaded: built on the shared object-store weights, kept in a
least-recently-used cache, each with its own batcher.

The replica that parsed a request runs the model itself: no second deployment, no handle call on
the request path. Loading a version is the only time the replica asks the controller anything
(for the weights ref and manifest); the weights are then read-only views into the node's object
store, shared by every replica on the node.
"""

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List

import numpy as np
import torch

from orchestrator.registry.servable import build_servable
from serve.batching import AdaptiveBatcher, split_rows

Outputs = Dict[str, np.ndarray]
WeightsLoader = Callable[[str, int], Awaitable[Dict[str, Any]]]
"""(model, version) -> {"ref": ObjectRef of the weights dict, "manifest": manifest}."""


@dataclass(frozen=True)
class LoadedModel:
    """One version as a replica runs it."""

    model: str
    version: int
    batcher: AdaptiveBatcher
    arrays: Dict[str, np.ndarray]
    """Read-only views into the object store (kept alive as long as the model is loaded)."""
    ref_hex: str


def classify(forward: Callable[[torch.Tensor], torch.Tensor], input_name: str) -> Callable[[List[Dict]], List[Outputs]]:
    """The batch function of a classifier: requests' inputs -> {"probabilities", "label"} per request."""

    def run(requests: List[Dict[str, np.ndarray]]) -> List[Outputs]:
        rows = [request[input_name] for request in requests]
        x = torch.from_numpy(rows[0] if len(rows) == 1 else np.concatenate(rows))
        with torch.inference_mode():
            probabilities = torch.softmax(forward(x), dim=1).numpy()
        outputs = {"probabilities": probabilities, "label": probabilities.argmax(axis=1)}
        return [outputs] if len(rows) == 1 else split_rows(outputs, [len(r) for r in rows])

    return run


class ModelCache:
    """Loaded versions, at most `max_models`, least recently used leaving first. Concurrent first
    requests for a version share one load."""

    def __init__(self, load_weights: WeightsLoader, *, max_models: int, max_batch_size: int,
                 on_batch: Callable[[str, int, int], None]):
        self._load_weights = load_weights
        self._max_models = max_models
        self._max_batch_size = max_batch_size
        self._on_batch = on_batch
        self._loaded: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._loading: Dict[tuple, asyncio.Task] = {}

    async def get(self, model: str, version: int) -> LoadedModel:
        """The loaded version, loading it first if needed. Raises what loading raised."""
        key = (model, version)
        if key in self._loaded:
            self._loaded.move_to_end(key)
            return self._loaded[key]
        if key not in self._loading:
            self._loading[key] = asyncio.get_running_loop().create_task(self._load(model, version))
        try:
            loaded = await asyncio.shield(self._loading[key])
        finally:
            if key in self._loading and self._loading[key].done():
                del self._loading[key]
        return loaded

    def loaded(self) -> List[tuple]:
        """(model, version) of every loaded version, least recently used first."""
        return list(self._loaded)

    async def _load(self, model: str, version: int) -> LoadedModel:
        info = await self._load_weights(model, version)
        arrays = await info["ref"]  # read-only numpy views into the node's object store
        manifest = info["manifest"]
        run = classify(build_servable(manifest, arrays), manifest["signature"]["inputs"][0]["name"])
        batcher = AdaptiveBatcher(run, max_batch_size=self._max_batch_size,
                                  on_batch=lambda size: self._on_batch(model, version, size))
        loaded = LoadedModel(model, version, batcher, arrays, info["ref"].hex())
        self._loaded[(model, version)] = loaded
        while len(self._loaded) > self._max_models:
            self._loaded.popitem(last=False)
        return loaded
