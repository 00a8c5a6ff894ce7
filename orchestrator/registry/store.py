"""Model registry on fsspec: append-only versions, atomic aliases, checksummed files.

Layout under `<root>/registry/<model>/`:
  versions/<N>/weights.npz       numpy arrays only (loading never unpickles)
  versions/<N>/manifest.json     sha256 of every file, metrics, resolved config, lineage, signature
  versions/<N>/manifest.sha256   checksum of the manifest itself
  aliases.json                   {"production": N, ...}, replaced atomically
A version folder without a manifest is an unfinished write: it is skipped, and its number is never reused.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import numpy as np

from orchestrator.config import is_identifier
from orchestrator.registry import storage

WEIGHTS = "weights.npz"
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"


class RegistryError(Exception):
    """A model, version or alias that does not exist, or an invalid registry operation."""


class IntegrityError(RegistryError):
    """A registry file does not match its recorded checksum."""


@dataclass(frozen=True)
class ModelVersion:
    """One registered version: its number, folder and manifest."""

    model: str
    version: int
    url: str
    manifest: Dict[str, Any]

    @property
    def metrics(self) -> Dict[str, Any]:
        return self.manifest.get("metrics", {})

    @property
    def signature(self) -> Dict[str, Any]:
        return self.manifest["signature"]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_to_bytes(state: Mapping[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    # Typed Any: numpy's stub would read a weight named 'allow_pickle' as that flag.
    arrays: Dict[str, Any] = {k: np.ascontiguousarray(v) for k, v in state.items()}
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def weights_from_bytes(data: bytes) -> Dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


class ModelRegistry:
    """Versions of named models under `<root>/registry`."""

    def __init__(self, root: str):
        self.url = storage.join(root, "registry")

    def register(
        self, model: str, weights: Mapping[str, np.ndarray], *, metrics: Dict[str, Any], config: Dict[str, Any],
        lineage: Dict[str, Any], signature: Dict[str, Any], variant: Optional[Dict[str, Any]] = None,
    ) -> ModelVersion:
        """Add the next version of `model`. Returns it; never rewrites an existing version.

        `variant` marks a compressed variant of another version ({"method", "parent_version", ...});
        `orchestrator.registry.servable.build_servable` dispatches on its "method".
        """
        _check_name(model, "model name")
        blob = weights_to_bytes(weights)
        version, url = self._claim_next_version(model)
        storage.write_bytes_atomic(storage.join(url, WEIGHTS), blob)
        manifest = {
            "model": model, "version": version, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "files": {WEIGHTS: sha256(blob)}, "metrics": metrics, "config": config, "lineage": lineage,
            "signature": signature,
        }
        if variant is not None:
            manifest["variant"] = variant
        text = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        storage.write_bytes_atomic(storage.join(url, MANIFEST_SUM), sha256(text).encode())
        storage.write_bytes_atomic(storage.join(url, MANIFEST), text)  # last: the version is complete
        return ModelVersion(model, version, url, json.loads(text))

    def models(self) -> List[str]:
        fs, path = storage.filesystem(self.url)
        if not fs.exists(path):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))

    def versions(self, model: str) -> List[int]:
        """Complete versions of `model`, oldest first."""
        return [
            n
            for n in self._all_version_numbers(model)
            if storage.exists(storage.join(self._version_url(model, n), MANIFEST))
        ]

    def aliases(self, model: str) -> Dict[str, int]:
        url = storage.join(self.url, model, "aliases.json")
        return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}

    def set_alias(self, model: str, alias: str, version: Union[int, str]) -> None:
        """Point `alias` at a version (or at what another alias points to)."""
        _check_name(alias, "alias")
        if alias.isdigit() or alias == "latest":
            raise RegistryError(f"alias {alias!r} is reserved: numbers are versions and 'latest' is the newest")
        number = self.resolve(model, version)
        aliases = {**self.aliases(model), alias: number}
        storage.write_bytes_atomic(
            storage.join(self.url, model, "aliases.json"), json.dumps(aliases, indent=2).encode()
        )

    def resolve(self, model: str, ref: Union[int, str]) -> int:
        """Version number of `ref`: a number, an alias, or 'latest'."""
        versions = self.versions(model)
        if not versions:
            raise RegistryError(f"model {model!r} has no versions in {self.url}")
        ref = str(ref)
        if ref == "latest":
            return versions[-1]
        number = int(ref) if ref.isdigit() else self.aliases(model).get(ref)
        if number is None:
            raise RegistryError(f"model {model!r} has no alias {ref!r} (aliases: {sorted(self.aliases(model))})")
        if number not in versions:
            raise RegistryError(f"model {model!r} has no version {number} (versions: {versions})")
        return number

    def get(self, model: str, ref: Union[int, str]) -> ModelVersion:
        """The manifest of a version, checked against its checksum."""
        number = self.resolve(model, ref)
        url = self._version_url(model, number)
        text = storage.read_bytes(storage.join(url, MANIFEST))
        expected = storage.read_bytes(storage.join(url, MANIFEST_SUM)).decode().strip()
        if sha256(text) != expected:
            raise IntegrityError(f"{model} v{number}: manifest.json does not match manifest.sha256")
        return ModelVersion(model, number, url, json.loads(text))

    def load(self, model: str, ref: Union[int, str]) -> Tuple[ModelVersion, Dict[str, np.ndarray]]:
        """A version and its weights, every file verified against the manifest (IntegrityError if not)."""
        version = self.get(model, ref)
        blob = storage.read_bytes(storage.join(version.url, WEIGHTS))
        if sha256(blob) != version.manifest["files"][WEIGHTS]:
            raise IntegrityError(f"{model} v{version.version}: {WEIGHTS} does not match its sha256 in the manifest")
        return version, weights_from_bytes(blob)

    def _version_url(self, model: str, number: int) -> str:
        return storage.join(self.url, model, "versions", str(number))

    def _all_version_numbers(self, model: str) -> List[int]:
        fs, path = storage.filesystem(storage.join(self.url, model, "versions"))
        if not fs.exists(path):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        return sorted(int(n) for n in names if n.isdigit())

    def _claim_next_version(self, model: str) -> Tuple[int, str]:
        local = storage.is_local(self.url)
        number = max(self._all_version_numbers(model), default=0) + 1
        while True:
            url = self._version_url(model, number)
            fs, path = storage.filesystem(url)
            if local:
                try:  # mkdir is atomic: two writers never get the same number
                    os.makedirs(path, exist_ok=False)
                    return number, url
                except FileExistsError:
                    pass
            elif not fs.exists(path):  # object stores have no folders; first writer wins by a hair
                return number, url
            number += 1


def _check_name(name: str, what: str) -> None:
    if not is_identifier(name):
        raise RegistryError(f"invalid {what} {name!r}: use letters, digits, '-', '_' or '.'")


def signature_for(input_shape: List[int], num_classes: int) -> Dict[str, Any]:
    """The input/output signature recorded in a manifest and served as v2 model metadata."""
    features = int(np.prod(input_shape))
    return {
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, features]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, num_classes]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }
