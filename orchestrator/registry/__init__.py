"""Versioned models: `store` (the registry on fsspec), `storage` (filesystem helpers shared with training),
`tensors` (weights as numpy arrays and safetensors files, bf16 included) and `servable` (a version as a
torch module plus its input signature).

    from orchestrator.registry import ModelRegistry
    version = ModelRegistry(root).get("digits", "production")   # or .get("models:/digits@production")

`servable` and `tensors` are not re-exported: they import torch (and the training models).
"""

from orchestrator.registry.crypto import MasterKey, MasterKeyError, new_master_key, rotate_master_key
from orchestrator.registry.refs import ModelRef, parse_ref
from orchestrator.registry.store import (
    LEGACY_WEIGHTS,
    MANIFEST,
    MANIFEST_SUM,
    WEIGHTS,
    IntegrityError,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    registry_for,
    sha256,
    signature_for,
    weights_from_bytes,
    weights_to_bytes,
)

__all__ = [
    "LEGACY_WEIGHTS", "MANIFEST", "MANIFEST_SUM", "WEIGHTS", "IntegrityError", "ModelRegistry", "ModelVersion",
    "RegistryError", "sha256", "signature_for", "weights_from_bytes", "weights_to_bytes", "ModelRef", "parse_ref",
    "MasterKey", "MasterKeyError", "new_master_key", "registry_for", "rotate_master_key",
]
