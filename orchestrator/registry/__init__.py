"""Versioned models: `store` (the registry on fsspec), `storage` (filesystem helpers shared with training)
and `servable` (a version as a torch module plus its input signature).

    from orchestrator.registry import ModelRegistry
    version = ModelRegistry(root).get("digits", "production")

`servable` is not re-exported: it imports torch and the training models.
"""

from orchestrator.registry.store import (
    MANIFEST,
    MANIFEST_SUM,
    WEIGHTS,
    IntegrityError,
    ModelRegistry,
    ModelVersion,
    RegistryError,
    sha256,
    signature_for,
    weights_from_bytes,
    weights_to_bytes,
)

__all__ = [
    "MANIFEST", "MANIFEST_SUM", "WEIGHTS", "IntegrityError", "ModelRegistry", "ModelVersion", "RegistryError",
    "sha256", "signature_for", "weights_from_bytes", "weights_to_bytes",
]
