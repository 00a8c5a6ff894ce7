"""Weights in the object store: one detached holder actor per version puts them there once, and
every replica reads that copy zero-copy."""

from typing import Dict, Optional

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.config import EncryptionConfig
from orchestrator.registry import ModelRegistry, ModelVersion
from serve.names import NAMESPACE


@ray.remote(num_cpus=0)
class _WeightsHolder:
    """Owns the object-store copy of one version's weights for as long as it lives.

    An object lives only as long as its owner. A ref put by a `serve deploy` build task, or by a
    driver that exits after deploying, would die with it; this detached actor outlives both.
    """

    def __init__(self):
        self._ref: Optional[ray.ObjectRef] = None

    def load(self, root: str, model: str, version: int,
             encryption: Optional[EncryptionConfig] = None) -> Dict[str, ray.ObjectRef]:
        # Verify on every call, not only the first: a build must fail on a tampered file even
        # when an earlier, verified copy is already held. On a local root the arrays are a memory
        # map of the verified file; ray.put copies them into the object store once. Encrypted
        # weights are decrypted in this process's memory, with the master key as this process sees it.
        _, weights = ModelRegistry(root, encryption=encryption).load(model, version)
        if self._ref is None:
            self._ref = ray.put(weights)
        return {"ref": self._ref}  # in a dict so the caller receives the ref, not the arrays

    def holds_weights(self) -> bool:
        return self._ref is not None


def weights_holder_name(version: ModelVersion) -> str:
    """Name of the detached actor holding `version`'s weights (namespace "orchestrator").

    The weights digest is part of the name: two registries that both have a 'v1' of a model
    never share a holder unless their weights are identical.
    """
    return f"weights:{version.model}:v{version.version}:{version.weights_sha256[:12]}"


def weights_ref(root: str, version: ModelVersion, encryption: Optional[EncryptionConfig] = None) -> ray.ObjectRef:
    """The shared object-store copy of `version`'s weights, verified against the registry.

    `encryption` (`registry.encryption`) names the master key of encrypted weights; the holder reads it
    (environment variable or key file) on the node it runs on, next to the caller.
    Raises IntegrityError when the registry files do not match their checksums, MasterKeyError when
    the weights are encrypted and the key is missing or wrong.
    """
    holder = _WeightsHolder.options(  # type: ignore[attr-defined]  # @ray.remote makes it an ActorClass
        name=weights_holder_name(version), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        # Next to the caller, which can read the storage root (a local root may exist only there).
        scheduling_strategy=NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True),
    ).remote()
    try:
        return ray.get(holder.load.remote(root, version.model, version.version, encryption))["ref"]
    except ray.exceptions.RayTaskError as err:
        if not ray.get(holder.holds_weights.remote()):
            ray.kill(holder)  # an empty holder would only keep a process alive
        raise err.cause from None
