"""Model registry on fsspec: append-only versions, atomic aliases, checksummed files.

Layout under `<root>/registry/<model>/`:
  versions/<N>/weights.safetensors  the weights (safetensors: a JSON header and raw bytes, never unpickled)
  versions/<N>/<extra files>        what a version needs besides weights (a tokenizer, say), checksummed alike
  versions/<N>/manifest.json        sha256 of every file, the weights' format and dtypes, metrics, config, ...
  versions/<N>/manifest.sha256      checksum of the manifest itself
  versions/<N>/claim.json           written first, create-only: who claimed the number, and when
  versions/<N>/tags.json            {key: value} tags set after registration (outside the checksummed manifest)
  versions/<N>/keys.json            with registry.encryption: the version's wrapped data key (outside the manifest,
                                    so rotating the master key leaves weights and checksums alone; see `crypto`)
  aliases.json                      {"production": N, ...}, replaced atomically
A version folder without a manifest is an unfinished write: it is skipped, and its number is never reused.
Concurrent writers lose nothing: a number belongs to whoever created its claim.json (create-only), and
aliases.json changes by compare-and-swap (`orchestrator.registry.storage`), locally and on S3.
Versions written before safetensors hold `weights.npz` (numpy arrays, loaded with allow_pickle=False);
they still load. How bf16 weights travel as numpy arrays: `orchestrator.registry.tensors`.
Wherever a version is named, any reference form of `orchestrator.registry.refs` is accepted.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import socket
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from orchestrator.config import EncryptionConfig, PipelineConfig, is_identifier
from orchestrator.registry import storage
from orchestrator.registry.refs import split_ref

WEIGHTS = "weights.safetensors"
LEGACY_WEIGHTS = "weights.npz"
"""The weights file of versions registered before safetensors (read-only support)."""
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.sha256"
CLAIM = "claim.json"
TAGS = "tags.json"
"""Tags of a version: mutable, so beside the manifest rather than in it."""
KEYS = "keys.json"
"""An encrypted version's wrapped data key (`orchestrator.registry.crypto`)."""
_RESERVED = (WEIGHTS, LEGACY_WEIGHTS, MANIFEST, MANIFEST_SUM, TAGS, CLAIM, KEYS)
_LEGACY_WEIGHTS_SPEC = {"file": LEGACY_WEIGHTS, "format": "npz"}
_HASH_CHUNK = 8 << 20


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

    @property
    def weights_file(self) -> str:
        """The weights' file name in the version folder (`WEIGHTS`, or `LEGACY_WEIGHTS` for old versions)."""
        return _weights_spec(self.manifest)["file"]

    @property
    def weights_sha256(self) -> str:
        return self.manifest["files"][self.weights_file]

    @property
    def weights_dtypes(self) -> Dict[str, str]:
        return weights_dtypes(self.manifest)

    @property
    def extra_files(self) -> List[str]:
        """Names of the files registered with the version besides its weights (`ModelRegistry.read_file`)."""
        return sorted(set(self.manifest["files"]) - {self.weights_file})


def weights_dtypes(manifest: Mapping[str, Any]) -> Dict[str, str]:
    """{name: real dtype} of the weights whose arrays carry a dtype numpy lacks (bf16 as uint16; see
    `orchestrator.registry.tensors`); empty when every array is its own dtype."""
    return _weights_spec(manifest).get("dtypes", {})


def _weights_spec(manifest: Mapping[str, Any]) -> Dict[str, Any]:
    """{"file", "format"[, "dtypes"]}; manifests from before safetensors have none and mean weights.npz."""
    return manifest.get("weights", _LEGACY_WEIGHTS_SPEC)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def weights_to_bytes(weights: Mapping[str, Any]) -> bytes:
    """The safetensors file the registry writes for `weights` (numpy arrays or torch tensors)."""
    from orchestrator.registry.tensors import to_arrays, to_safetensors  # imports torch

    return to_safetensors(*to_arrays(weights))


def weights_from_bytes(data: bytes) -> Dict[str, np.ndarray]:
    """The arrays of a safetensors file (bf16 tensors as their uint16 carriers; see `tensors`)."""
    from orchestrator.registry.tensors import from_safetensors  # imports torch

    return from_safetensors(data)[0]


def _npz_arrays(data: bytes) -> Dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


class ModelRegistry:
    """Versions of named models under `<root>/registry`."""

    def __init__(self, root: str, *, encryption: Optional[EncryptionConfig] = None):
        """`encryption`: whether new versions' weights are encrypted, and the master key's source, read
        when weights are written or loaded (default: off; encrypted versions open with $ORCHESTRATOR_MASTER_KEY)."""
        self.url = storage.join(root, "registry")
        self.encryption = encryption or EncryptionConfig()

    def register(
        self, model: str, weights: Mapping[str, Any], *, metrics: Dict[str, Any], config: Dict[str, Any],
        lineage: Dict[str, Any], signature: Dict[str, Any], variant: Optional[Dict[str, Any]] = None,
        files: Optional[Mapping[str, bytes]] = None, promotion: Optional[Dict[str, Any]] = None,
    ) -> ModelVersion:
        """Add the next version of `model`. Returns it; never rewrites an existing version.

        `weights`: numpy arrays or torch tensors of any dtype (bf16 included), stored as safetensors.
        `files`: extra files by name (e.g. {"tokenizer.json": ...}), written beside the weights and
        checksummed in the manifest; read one back with `read_file`.
        `variant` marks a compressed variant of another version ({"method", "parent_version", ...});
        `orchestrator.registry.servable.build_servable` dispatches on its "method".
        `promotion` records whether the version was promoted at registration, and why
        (`orchestrator.registry.promotion.Decision.record`).
        With `encryption.enabled` the weights file is ciphertext (`orchestrator.registry.crypto`); extra
        files stay in the clear.
        Raises RegistryError for an invalid model or file name, MasterKeyError (before anything is
        written) when encryption is on and the master key is missing.
        """
        from orchestrator.registry import crypto  # here: crypto imports this module
        from orchestrator.registry.tensors import to_arrays, to_safetensors  # imports torch

        _check_name(model, "model name")
        files = files or {}
        for name in files:
            _check_name(name, "file name")
            if name in _RESERVED:
                raise RegistryError(f"file name {name!r} is reserved for the registry's own files")
        arrays, dtypes = to_arrays(weights)
        blobs = {WEIGHTS: to_safetensors(arrays, dtypes), **files}
        master = crypto.key_for_writes(self.encryption)  # before claiming: a missing key leaves no version behind
        version, url = self._claim_next_version(model)
        encryption = None
        if master is not None:  # the plaintext weights never reach storage, not even as a temp file
            blobs[WEIGHTS], encryption = crypto.seal_file(master, url, model, version, WEIGHTS, blobs[WEIGHTS])
        for name, blob in blobs.items():
            storage.write_bytes_atomic(storage.join(url, name), blob)
        manifest = {
            "model": model, "version": version, "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "files": {name: sha256(blob) for name, blob in blobs.items()},
            "weights": {"file": WEIGHTS, "format": "safetensors", **({"dtypes": dtypes} if dtypes else {})},
            "metrics": metrics, "config": config, "lineage": lineage, "signature": signature,
        }
        if variant is not None:
            manifest["variant"] = variant
        if promotion is not None:
            manifest["promotion"] = promotion
        if encryption is not None:
            manifest["encryption"] = encryption
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
        if (alias.isascii() and alias.isdigit()) or alias == "latest":
            raise RegistryError(f"alias {alias!r} is reserved: numbers are versions and 'latest' is the newest")
        number = self.resolve(model, version)
        # Compare-and-swap in a retry loop: an alias another writer sets meanwhile is kept.
        storage.update_json(storage.join(self.url, model, "aliases.json"),
                            lambda aliases: {**(aliases or {}), alias: number})

    def delete_alias(self, model: str, alias: str) -> int:
        """Remove `alias` of `model`; returns the version it pointed to. Raises RegistryError when there is none."""
        removed: Dict[str, int] = {}

        def without_alias(aliases: Optional[Dict[str, int]]) -> Dict[str, int]:
            aliases = dict(aliases or {})
            if alias not in aliases:
                raise RegistryError(f"model {model!r} has no alias {alias!r} (aliases: {sorted(aliases)})")
            removed[alias] = aliases.pop(alias)
            return aliases

        # Compare-and-swap in a retry loop, as in set_alias: an alias another writer sets meanwhile is kept.
        storage.update_json(storage.join(self.url, model, "aliases.json"), without_alias)
        return removed[alias]

    def tags(self, model: str, ref: Union[int, str, None] = None) -> Dict[str, str]:
        """Tags of a version (named as `resolve` takes it); {} when it has none."""
        return _read_tags(self.get(model, ref))

    def set_tags(self, model: str, ref: Union[int, str, None], tags: Mapping[str, str], *,
                 remove: Sequence[str] = ()) -> Dict[str, str]:
        """Set `tags` on a version and drop the keys in `remove`; returns all its tags.

        Tags live in `tags.json` beside the manifest, which stays as registered (and checksummed).
        Raises RegistryError for an invalid key or a key in `remove` the version lacks.
        """
        version = self.get(model, ref)
        for key in [*tags, *remove]:
            _check_name(key, "tag key")

        def updated(current: Optional[Dict[str, str]]) -> Dict[str, str]:
            current = current or {}
            missing = sorted(set(remove) - set(current))
            if missing:
                raise RegistryError(f"{version.model} v{version.version} has no tags {missing} "
                                    f"(tags: {sorted(current)})")
            return {k: v for k, v in {**current, **tags}.items() if k not in remove}

        # Compare-and-swap in a retry loop: tags another writer sets meanwhile are kept.
        return storage.update_json(storage.join(version.url, TAGS), updated)

    def resolve(self, model: str, ref: Union[int, str, None] = None) -> int:
        """Version number of `ref`: a number, an alias, 'latest', or a reference naming `model`
        ("models:/digits@production", "digits:3"); with `ref` None, `model` is such a reference."""
        model, ref = _split_ref(model, ref)
        versions = self.versions(model)
        if not versions:
            raise RegistryError(f"model {model!r} has no versions in {self.url}")
        ref = str(ref)
        if ref == "latest":
            return versions[-1]
        number = int(ref) if ref.isascii() and ref.isdigit() else self.aliases(model).get(ref)
        if number is None:
            raise RegistryError(f"model {model!r} has no alias {ref!r} (aliases: {sorted(self.aliases(model))})")
        if number not in versions:
            raise RegistryError(f"model {model!r} has no version {number} (versions: {versions})")
        return number

    def get(self, model: str, ref: Union[int, str, None] = None) -> ModelVersion:
        """The manifest of a version (named as `resolve` takes it), checked against its checksum."""
        model, ref = _split_ref(model, ref)
        number = self.resolve(model, ref)
        url = self._version_url(model, number)
        text = storage.read_bytes(storage.join(url, MANIFEST))
        expected = storage.read_bytes(storage.join(url, MANIFEST_SUM)).decode().strip()
        if sha256(text) != expected:
            raise IntegrityError(f"{model} v{number}: manifest.json does not match manifest.sha256")
        return ModelVersion(model, number, url, json.loads(text))

    def load(self, model: str, ref: Union[int, str, None] = None) -> Tuple[ModelVersion, Dict[str, np.ndarray]]:
        """A version and its weights (read-only arrays; bf16 as uint16 carriers, named in
        `version.weights_dtypes`), the weights file verified against the manifest (IntegrityError if not).

        On a local root the safetensors file is hashed by streaming it, then memory-mapped: it is never
        held in private memory whole. On other roots, and for encrypted weights (decrypted in memory,
        never to disk), its bytes are read once, hashed and parsed. Raises MasterKeyError when the
        weights are encrypted and the master key is missing or wrong.
        """
        from orchestrator.registry import crypto  # here: crypto imports this module
        from orchestrator.registry.tensors import from_safetensors, load_safetensors_file  # imports torch

        version = self.get(model, ref)
        name = version.weights_file
        if _weights_spec(version.manifest)["format"] == "npz":
            return version, _npz_arrays(self._verified_bytes(version, name))
        url = storage.join(version.url, name)
        if storage.is_local(url) and not crypto.is_encrypted(version.manifest, name):
            self._verify_streaming(version, name)
            arrays, dtypes = load_safetensors_file(storage.filesystem(url)[1])
        else:
            arrays, dtypes = from_safetensors(self._verified_bytes(version, name))
        if dtypes != version.weights_dtypes:
            raise IntegrityError(f"{version.model} v{version.version}: {name} holds dtypes {dtypes}, "
                                 f"the manifest records {version.weights_dtypes}")
        return version, arrays

    def read_file(self, model: str, ref: Union[int, str], name: str) -> bytes:
        """One file registered with a version (e.g. "tokenizer.json"), verified against the manifest.

        Raises RegistryError when the version has no such file, IntegrityError when it does not match.
        """
        version = self.get(model, ref)
        if name not in version.manifest["files"]:
            raise RegistryError(f"{model} v{version.version} has no file {name!r} (files: {version.extra_files})")
        return self._verified_bytes(version, name)

    def _verified_bytes(self, version: ModelVersion, name: str) -> bytes:
        from orchestrator.registry import crypto  # here: crypto imports this module

        if crypto.is_encrypted(version.manifest, name):
            return crypto.open_file(self.encryption, version, name)
        blob = storage.read_bytes(storage.join(version.url, name))
        _check_sha256(version, name, sha256(blob))
        return blob

    def _verify_streaming(self, version: ModelVersion, name: str) -> None:
        fs, path = storage.filesystem(storage.join(version.url, name))
        digest = hashlib.sha256()
        with fs.open(path, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                digest.update(chunk)
        _check_sha256(version, name, digest.hexdigest())

    def _version_url(self, model: str, number: int) -> str:
        return storage.join(self.url, model, "versions", str(number))

    def _all_version_numbers(self, model: str) -> List[int]:
        fs, path = storage.filesystem(storage.join(self.url, model, "versions"))
        if not fs.exists(path):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))
        return sorted(int(n) for n in names if n.isascii() and n.isdigit())

    def _claim_next_version(self, model: str) -> Tuple[int, str]:
        """The next free number and its folder, claimed by creating its claim.json: create-only
        (a hard link locally, If-None-Match on S3), so of concurrent writers exactly one gets each number."""
        number = max(self._all_version_numbers(model), default=0) + 1
        claim = json.dumps({"claimed_at": dt.datetime.now(dt.timezone.utc).isoformat(),
                            "host": socket.gethostname(), "pid": os.getpid()}).encode()
        while not storage.create_exclusive(storage.join(self._version_url(model, number), CLAIM), claim):
            number += 1
        return number, self._version_url(model, number)


def _read_tags(version: ModelVersion) -> Dict[str, str]:
    url = storage.join(version.url, TAGS)
    return json.loads(storage.read_bytes(url)) if storage.exists(url) else {}


def _split_ref(model: str, ref: Union[int, str, None]) -> Tuple[str, str]:
    try:
        return split_ref(model, ref)
    except ValueError as err:
        raise RegistryError(str(err)) from err


def _check_sha256(version: ModelVersion, name: str, actual: str) -> None:
    if actual != version.manifest["files"][name]:
        raise IntegrityError(f"{version.model} v{version.version}: {name} does not match its sha256 in the manifest")


def _check_name(name: str, what: str) -> None:
    if not is_identifier(name):
        raise RegistryError(f"invalid {what} {name!r}: use letters, digits, '-', '_' or '.'")


def registry_for(cfg: PipelineConfig) -> ModelRegistry:
    """The registry under `cfg.storage.root`, encrypting weights as `cfg.registry.encryption` says.

    Also applies `cfg.storage`'s S3 server-side encryption to this process's writes (manifests and
    aliases included): build the registry of a config this way, not with `ModelRegistry(root)`.
    """
    storage.use_s3_server_side_encryption(cfg.storage.s3_sse, cfg.storage.s3_sse_kms_key_id)
    return ModelRegistry(cfg.storage.root, encryption=cfg.registry.encryption)


def text_signature_for(context: int, num_classes: int, class_names: List[str]) -> Dict[str, Any]:
    """The signature of a text classifier: one string per row (BYTES), tokenized in the replica with the
    version's own tokenizer.json to `context` ids (truncated, padded), as its training data was."""
    return {
        **signature_for([context], num_classes),
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "tokenizer": "tokenizer.json",
        "context": context,
        "class_names": list(class_names),
    }


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
