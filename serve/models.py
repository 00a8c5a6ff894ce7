"""The versions a serving replica has loaded: built on the shared object-store weights, kept in a
least-recently-used cache, each with its own batcher; a language model also with its generation
engine (serve.generation: continuous batching over a KV cache, on the same shared weights).

The replica that parsed a request runs the model itself: no second deployment, no handle call on
the request path. Loading a version is the only time the replica asks the controller anything
(for the weights ref and manifest, and a language model's tokenizer); the weights are then read-only
views into the node's object store, shared by every replica on the node.
"""

import asyncio
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Dict, List, Optional

import numpy as np
import torch

from orchestrator.config.schema import GenerationConfig
from orchestrator.registry.servable import build_servable
from orchestrator.training.text import tokenizer_from_bytes
from serve.batching import AdaptiveBatcher, split_rows
from serve.generation import GenerationEngine, load_gpt

Outputs = Dict[str, np.ndarray]
WeightsLoader = Callable[[str, int], Awaitable[Dict[str, Any]]]
"""(model, version) -> {"ref": ObjectRef of the weights dict, "manifest": manifest[, "tokenizer": bytes]}."""
StepHook = Callable[[str, int, int, int], None]
"""(model, version, running, waiting) after each step of a version's generation engine."""
LANGUAGE_MODEL_TASK = "causal_lm"


@dataclass(frozen=True)
class LoadedModel:
    """One version as a replica runs it."""

    model: str
    version: int
    batcher: AdaptiveBatcher
    arrays: Dict[str, np.ndarray]
    """Read-only views into the object store (kept alive as long as the model is loaded)."""
    ref_hex: str
    engine: Optional[GenerationEngine] = None
    """A language model's generation engine (None for a classifier)."""


Encoder = Callable[[np.ndarray], torch.Tensor]
"""A request input's rows (as parsed) -> the model's input batch."""


def classify(forward: Callable[[torch.Tensor], torch.Tensor], input_name: str,
             encode: Encoder = torch.from_numpy) -> Callable[[List[Dict]], List[Outputs]]:
    """The batch function of a classifier: requests' inputs -> {"probabilities", "label"} per request."""

    def run(requests: List[Dict[str, np.ndarray]]) -> List[Outputs]:
        rows = [request[input_name] for request in requests]
        x = encode(rows[0] if len(rows) == 1 else np.concatenate(rows))
        with torch.inference_mode():
            probabilities = torch.softmax(forward(x), dim=1).numpy()
        outputs = {"probabilities": probabilities, "label": probabilities.argmax(axis=1)}
        return [outputs] if len(rows) == 1 else split_rows(outputs, [len(r) for r in rows])

    return run


def text_encoder(tokenizer: bytes, context: int) -> Encoder:
    """BYTES rows (one UTF-8 string each) -> token ids [n, context], encoded as the version's training data was
    (orchestrator.training.labeled_text.encode_texts: special tokens, truncation, padding)."""
    from orchestrator.training.labeled_text import encode_texts

    def encode(rows: np.ndarray) -> torch.Tensor:
        texts = [row.decode("utf-8", "replace") if isinstance(row, bytes) else str(row) for row in rows.ravel()]
        ids, _ = encode_texts(tokenizer, texts, context)
        return torch.from_numpy(ids.astype(np.int64))  # integers: a bf16 model must not round them

    return encode


def next_token_logits(forward: Callable[[torch.Tensor], torch.Tensor],
                      input_name: str) -> Callable[[List[Dict]], List[Outputs]]:
    """The batch function of a language model's v2 infer: token ids [n, T] -> {"logits": [n, T, vocab]} per
    request. One pass per request: requests' rows may differ in length."""

    def run(requests: List[Dict[str, np.ndarray]]) -> List[Outputs]:
        with torch.inference_mode():
            return [{"logits": forward(torch.from_numpy(request[input_name])).numpy()} for request in requests]

    return run


class ModelCache:
    """Loaded versions, at most `max_models`, least recently used leaving first. Concurrent first
    requests for a version share one load. A language model leaving closes its engine (whatever it
    still generates ends with an error)."""

    def __init__(self, load_weights: WeightsLoader, *, max_models: int, max_batch_size: int,
                 on_batch: Callable[[str, int, int], None], generation: GenerationConfig, on_step: StepHook):
        self._load_weights = load_weights
        self._max_models = max_models
        self._max_batch_size = max_batch_size
        self._on_batch = on_batch
        self._generation = generation
        self._on_step = on_step
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

    def find(self, model: str, version: int) -> Optional[LoadedModel]:
        """The version if it is loaded, else None (loads nothing)."""
        return self._loaded.get((model, version))

    def loaded(self) -> List[tuple]:
        """(model, version) of every loaded version, least recently used first."""
        return list(self._loaded)

    async def _load(self, model: str, version: int) -> LoadedModel:
        info = await self._load_weights(model, version)
        arrays = await info["ref"]  # read-only numpy views into the node's object store
        manifest = info["manifest"]
        signature = manifest["signature"]
        generates = signature.get("task") == LANGUAGE_MODEL_TASK
        forward, first_input = build_servable(manifest, arrays), signature["inputs"][0]
        if generates:
            run = next_token_logits(forward, first_input["name"])
        elif first_input["datatype"] == "BYTES":  # a text classifier tokenizes here, with its own tokenizer
            run = classify(forward, first_input["name"], text_encoder(info["tokenizer"], signature["context"]))
        else:
            run = classify(forward, first_input["name"])
        batcher = AdaptiveBatcher(run, max_batch_size=self._max_batch_size,
                                  on_batch=lambda size: self._on_batch(model, version, size))
        engine = self._engine(model, version, manifest, arrays, info["tokenizer"]) if generates else None
        loaded = LoadedModel(model, version, batcher, arrays, info["ref"].hex(), engine)
        self._loaded[(model, version)] = loaded
        while len(self._loaded) > self._max_models:
            _, evicted = self._loaded.popitem(last=False)
            if evicted.engine is not None:
                evicted.engine.close()
        return loaded

    def _engine(self, model: str, version: int, manifest: Dict[str, Any], arrays: Dict[str, np.ndarray],
                tokenizer: bytes) -> GenerationEngine:
        cfg = self._generation
        return GenerationEngine(
            load_gpt(manifest, arrays), tokenizer_from_bytes(tokenizer), max_running=cfg.max_running_sequences,
            max_waiting=cfg.max_waiting_sequences, on_step=lambda running, waiting: self._on_step(
                model, version, running, waiting),
        )
