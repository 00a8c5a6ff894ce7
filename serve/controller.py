"""The rollout controller: the one replica owning the routing table (stable, candidate, split),
the admin actions, automatic rollback and the weights refs; ingress replicas sync with it."""

import dataclasses
import datetime as dt
import logging
import threading
from typing import Any, Dict, List, Optional, Tuple

import ray
from ray import serve

from orchestrator.config import EncryptionConfig
from orchestrator.registry import ModelRegistry, ModelVersion, RegistryError
from serve.calls import to_answer
from serve.names import CONTROLLER_DEPLOYMENT, model_id
from serve.rollout import RollbackPolicy, Route, RouteTable
from serve.weights import weights_ref

LANGUAGE_MODEL_TASK = "causal_lm"
TOKENIZER_FILE = "tokenizer.json"
"""The version file a language model's replicas build its tokenizer from."""

log = logging.getLogger(__name__)


@serve.deployment(name=CONTROLLER_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
class RolloutController:
    """The one routing table of the app: which version serves each model's unversioned traffic,
    the canary split, promotion, rollback (by request or by the policy), and the weights refs."""

    def __init__(self, *, root: str, default_ref: str, model: str, version: int, weights: Dict[str, ray.ObjectRef],
                 rollout, encryption: Optional[EncryptionConfig] = None):
        self._registry = ModelRegistry(root, encryption=encryption)
        self._root, self._default_ref = root, default_ref
        self._table = RouteTable(RollbackPolicy(rollout))
        self._versions: Dict[Tuple[str, int], ModelVersion] = {}
        self._weights: Dict[Tuple[str, int], ray.ObjectRef] = {}
        self._tokenizers: Dict[Tuple[str, int], bytes] = {}
        self._listed: Dict[Tuple[str, int], ModelVersion] = {}
        """Manifests read for the index only (their weights not loaded)."""
        # Serve runs sync methods in a thread pool: one lock keeps each step whole.
        self._lock = threading.RLock()
        self._versions[(model, version)] = self._registry.get(model, version)
        self._weights[(model, version)] = weights["ref"]
        self._table.add(model, version)

    def snapshot(self) -> Dict[str, Any]:
        """{"routes": {model: Route fields}, "signatures": {model id: signature}} for the ingress."""
        with self._lock:
            signatures = {model_id(m, v): mv.signature for (m, v), mv in self._versions.items()}
            routes = {m: dataclasses.asdict(r) for m, r in self._table.routes.items()}
            return {"routes": routes, "signatures": signatures}

    def sync(self, outcomes: List[Tuple[str, int, bool, float]]) -> Dict[str, Any]:
        """Take an ingress replica's outcomes (for the rollback policy); the current snapshot."""
        with self._lock:
            for event in self._table.report(outcomes):
                log.warning("automatic rollback of %s: %s", event["model"], event["reason"])
        return self.snapshot()

    def serve_model(self, model: str) -> Dict[str, Any]:
        """Start routing `model` (at the default alias, or its latest version without one)."""
        def add():
            with self._lock:
                if model not in self._table.routes:
                    ref = self._default_ref if self._has_ref(model, self._default_ref) else "latest"
                    self._table.add(model, self._load(model, ref).version)
            return self.snapshot()
        return to_answer(add)

    def resolve(self, model: str, ref: str) -> Dict[str, Any]:
        """{"version", "signature"} of `ref` (number or alias) of `model`, weights loaded."""
        def find():
            version = self._load(model, ref)
            return {"version": version.version, "signature": version.signature}
        return to_answer(find)

    def weights(self, model: str, version: int) -> Dict[str, Any]:
        """{"ref", "manifest"} of a version, for a replica to build it (a ref in a dict stays a ref); a
        version that takes text (a language model, a text classifier) also {"tokenizer": its tokenizer.json}."""
        mv = self._load(model, str(version))
        answer = {"ref": self._weights[(model, mv.version)], "manifest": mv.manifest}
        if "tokenizer" in mv.signature:  # text in (a language model, a text classifier): its tokenizer too
            answer["tokenizer"] = self._tokenizer(model, mv.version)
        return answer

    def index(self) -> Dict[str, Any]:
        """{"models": [{"name", "versions", "aliases", "serving", "task", "created"}]}: every registry model
        this app can serve; task and created (Unix seconds) are those of the version its unversioned
        requests reach (the routed stable version, else the one the default alias or 'latest' names)."""
        def listing():
            with self._lock:
                serving = {m: dataclasses.asdict(r) for m, r in self._table.routes.items()}
            return {"models": [self._index_entry(m, serving.get(m)) for m in self._registry.models()]}
        return to_answer(listing)

    def _index_entry(self, model: str, route: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        versions = self._registry.versions(model)
        entry = {"name": model, "versions": [str(v) for v in versions], "serving": route,
                 "aliases": {a: str(v) for a, v in self._registry.aliases(model).items()}, "task": None, "created": 0}
        if versions:  # none yet while a model's first version is being written
            listed = self._manifest(model, route["stable"] if route else self._default_version(model, versions))
            created = dt.datetime.fromisoformat(listed.manifest["created_at"])
            entry.update(task=listed.signature.get("task", "classification"), created=int(created.timestamp()))
        return entry

    def start(self, model: str, ref: str, percent: float) -> Dict[str, Any]:
        def act():
            version = self._load(model, ref)
            with self._lock:
                generator = version.signature.get("task") == LANGUAGE_MODEL_TASK
                self._table.start(model, version.version, percent, generator=generator)
                return self._table.status(model)
        return to_answer(act)

    def promote(self, model: str) -> Dict[str, Any]:
        def act():
            with self._lock:
                route = self._table.promote(model)
                self._persist(model, route)
                return self._table.status(model)
        return to_answer(act)

    def rollback(self, model: str) -> Dict[str, Any]:
        def act():
            with self._lock:
                had_candidate = model in self._table.routes and self._table.routes[model].candidate is not None
                route = self._table.rollback(model, lambda v: self._older(model, v))
                if not had_candidate:
                    self._load(model, str(route.stable))
                    self._persist(model, route)
                return self._table.status(model)
        return to_answer(act)

    def status(self, model: str) -> Dict[str, Any]:
        def act():
            with self._lock:
                return self._table.status(model)
        return to_answer(act)

    def _load(self, model: str, ref: str) -> ModelVersion:
        number = self._registry.resolve(model, ref)
        with self._lock:
            if (model, number) not in self._versions:
                version = self._registry.get(model, number)
                self._weights[(model, number)] = weights_ref(self._root, version, self._registry.encryption)
                self._versions[(model, number)] = version
            return self._versions[(model, number)]

    def _tokenizer(self, model: str, number: int) -> bytes:
        with self._lock:
            if (model, number) not in self._tokenizers:  # verified against the manifest, read once
                self._tokenizers[(model, number)] = self._registry.read_file(model, number, TOKENIZER_FILE)
            return self._tokenizers[(model, number)]

    def _manifest(self, model: str, number: int) -> ModelVersion:
        # A version never changes: its manifest is read once.
        key = (model, number)
        if key not in self._listed:
            self._listed[key] = self._versions.get(key) or self._registry.get(model, number)
        return self._listed[key]

    def _default_version(self, model: str, versions: List[int]) -> int:
        """The version `serve_model` would route `model` to (without routing it)."""
        try:
            return self._registry.resolve(model, self._default_ref)
        except RegistryError:
            return versions[-1]

    def _has_ref(self, model: str, ref: str) -> bool:
        try:
            self._registry.resolve(model, ref)
            return True
        except RegistryError:
            if not self._registry.versions(model):
                raise
            return False

    def _older(self, model: str, version: int) -> Optional[int]:
        return max((v for v in self._registry.versions(model) if v < version), default=None)

    def _persist(self, model: str, route: Route) -> None:
        # Promotion and rollback move the deploy alias too, so the next deploy starts where this one is.
        ref = self._default_ref
        if not (ref.isascii() and ref.isdigit()) and ref != "latest":
            self._registry.set_alias(model, ref, route.stable)
