"""Weights encrypted at rest: AES-256-GCM under a data key per version, that key wrapped by a master key.

With `registry.encryption.enabled`, a version folder (`orchestrator.registry.store`) holds:
  weights.safetensors  ciphertext: a header (magic, nonce prefix, segment size), then the safetensors bytes in
                       segments, each sealed by AES-256-GCM under the version's random 256-bit data key
  keys.json            that data key wrapped (AES-256-GCM) by the master key, and the master key's id
  manifest.json        "encryption": {"scheme", "files", "keys"}; "files" holds the sha256 of the ciphertext
The master key is never written: it comes from an environment variable or a key file (`EncryptionConfig`),
read where and when weights are written or loaded. Plaintext weights exist in memory only.

Integrity is checked twice, by different means:
- the manifest's sha256 covers each file as written (the ciphertext), so checking checksums needs no key;
- GCM's tag authenticates every segment, with the header and the version's identity as associated data, and
  the last segment is marked: a flipped, truncated, reordered or transplanted file does not decrypt.
keys.json sits outside the checksummed manifest so that rotating the master key (`rotate_master_key`)
rewrites it alone. Its wrap is authenticated under the master key and names that key's id, so a wrong key
(MasterKeyError) is told apart from a damaged keys.json (IntegrityError).

Only weights are encrypted; extra files registered with a version (a tokenizer, say) are stored in the clear.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
from dataclasses import dataclass, field
from typing import IO, Any, Dict, List, Mapping, Optional, Tuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from orchestrator.config import EncryptionConfig
from orchestrator.registry import storage
from orchestrator.registry.store import KEYS, IntegrityError, ModelRegistry, ModelVersion, RegistryError

SCHEME = "aes-256-gcm-segmented-v1"
SEGMENT_BYTES = 4 << 20
"""Plaintext bytes per GCM segment: decryption holds one segment of ciphertext at a time."""
_MAGIC = b"ORCENC01"
_PREFIX_BYTES = 7  # nonce = 7-byte random prefix | 4-byte segment index | 1-byte last-segment flag
_HEADER_BYTES = len(_MAGIC) + _PREFIX_BYTES + 4
_TAG_BYTES = 16
_KEY_BYTES = 32


class MasterKeyError(RegistryError):
    """The master key is missing, malformed, or not the key that wrapped a version's data key."""


@dataclass(frozen=True)
class MasterKey:
    """A 256-bit master key and where it came from (for messages); its repr never shows the key."""

    key: bytes = field(repr=False)
    source: str
    """'$ORCHESTRATOR_MASTER_KEY', 'key file /path' or what the caller names."""

    def __post_init__(self) -> None:
        if len(self.key) != _KEY_BYTES:
            raise MasterKeyError(f"the master key from {self.source} must be {_KEY_BYTES} bytes, got {len(self.key)}")

    @property
    def key_id(self) -> str:
        """A fingerprint recorded beside each wrapped data key, so that a wrong key is named as such."""
        return hashlib.sha256(b"orchestrator.registry master key id\0" + self.key).hexdigest()[:16]

    @classmethod
    def from_base64(cls, text: str, source: str) -> MasterKey:
        """The key `text` holds (standard or URL-safe base64 of 32 bytes). Raises MasterKeyError."""
        value = text.strip()
        try:
            key = base64.b64decode(value.replace("-", "+").replace("_", "/"), validate=True)
        except (binascii.Error, ValueError):
            raise MasterKeyError(f"the master key in {source} is not base64 of {_KEY_BYTES} bytes") from None
        return cls(key=key, source=source)

    @classmethod
    def from_config(cls, cfg: EncryptionConfig) -> MasterKey:
        """The key `cfg` names: `key_file` when set, else the `key_env` variable. Raises MasterKeyError
        naming the variable or file when it is missing or malformed."""
        if cfg.key_file:
            source = f"key file {cfg.key_file} (registry.encryption.key_file)"
            try:
                with open(cfg.key_file, encoding="ascii") as f:
                    return cls.from_base64(f.read(), source)
            except (OSError, UnicodeDecodeError) as err:
                raise MasterKeyError(f"cannot read the master key from {source}: {err}") from None
        value = os.environ.get(cfg.key_env, "")
        if not value.strip():
            raise MasterKeyError(
                f"the registry master key is not set: put base64 of {_KEY_BYTES} bytes in the environment variable "
                f"{cfg.key_env} (registry.encryption.key_env), or name a file in registry.encryption.key_file"
            )
        return cls.from_base64(value, f"${cfg.key_env}")


def new_master_key() -> str:
    """A fresh random master key, as base64 (what `key_env` or a key file holds)."""
    return base64.b64encode(secrets.token_bytes(_KEY_BYTES)).decode()


def key_for_writes(cfg: EncryptionConfig) -> Optional[MasterKey]:
    """The master key new versions are encrypted under; None when encryption is off."""
    return MasterKey.from_config(cfg) if cfg.enabled else None


def is_encrypted(manifest: Mapping[str, Any], name: str) -> bool:
    """Whether file `name` of the version with this manifest is stored encrypted."""
    return name in manifest.get("encryption", {}).get("files", [])


def seal_file(master: MasterKey, url: str, model: str, version: int, name: str,
              plaintext: bytes) -> Tuple[bytes, Dict[str, Any]]:
    """Encrypt `plaintext` (file `name` of `model` v`version`, in folder `url`) under a new data key and
    write that key, wrapped by `master`, to the folder's keys.json.

    Returns the ciphertext to write in the plaintext's place, and the manifest's "encryption" entry.
    """
    data_key = secrets.token_bytes(_KEY_BYTES)
    storage.write_bytes_atomic(storage.join(url, KEYS), _keys_doc(master, data_key, model, version))
    entry = {"scheme": SCHEME, "files": [name], "keys": KEYS}
    return encrypt(data_key, plaintext, _context(model, version, name)), entry


def open_file(cfg: EncryptionConfig, version: ModelVersion, name: str) -> bytes:
    """The plaintext of encrypted file `name` of `version`, decrypted in memory.

    Raises MasterKeyError when the key `cfg` names is missing or is not the one that wrapped the data
    key, IntegrityError when the file or keys.json was altered (a checksum or a GCM tag fails).
    """
    label = f"{version.model} v{version.version}"
    try:
        master = MasterKey.from_config(cfg)
    except MasterKeyError as err:
        raise MasterKeyError(f"{label} is encrypted at rest: {err}") from None
    data_key = _unwrap(master, _read_keys(version.url, label), version.model, version.version, label)
    fs, path = storage.filesystem(storage.join(version.url, name))
    with fs.open(path, "rb") as f:
        plaintext, digest = decrypt(data_key, f, _context(version.model, version.version, name), f"{label}: {name}")
    if digest != version.manifest["files"][name]:
        raise IntegrityError(f"{label}: {name} does not match its sha256 in the manifest")
    return plaintext


def encrypt(data_key: bytes, plaintext: bytes, context: bytes) -> bytes:
    """`plaintext` sealed as header + AES-256-GCM segments; `context` is authenticated, not stored."""
    prefix = secrets.token_bytes(_PREFIX_BYTES)
    header = _MAGIC + prefix + SEGMENT_BYTES.to_bytes(4, "big")
    aead, aad, view = AESGCM(data_key), header + context, memoryview(plaintext)
    starts = range(0, max(len(plaintext), 1), SEGMENT_BYTES)  # an empty file is one empty last segment
    parts = [header]
    for index, start in enumerate(starts):
        last = start + SEGMENT_BYTES >= len(plaintext)
        parts.append(aead.encrypt(_nonce(prefix, index, last), view[start:start + SEGMENT_BYTES], aad))
    return b"".join(parts)


def decrypt(data_key: bytes, f: IO[bytes], context: bytes, label: str) -> Tuple[bytes, str]:
    """The plaintext of the ciphertext read from `f`, and the sha256 of that ciphertext (one pass).

    Raises IntegrityError naming `label` when the header is not ours or a segment fails its tag.
    """
    digest = hashlib.sha256()
    header = f.read(_HEADER_BYTES)
    digest.update(header)
    if len(header) != _HEADER_BYTES or not header.startswith(_MAGIC):
        raise IntegrityError(f"{label} is not an encrypted registry file (no {_MAGIC.decode()} header)")
    prefix, segment = header[len(_MAGIC):-4], int.from_bytes(header[-4:], "big")
    aead, aad, parts = AESGCM(data_key), header + context, []
    chunk, index = f.read(segment + _TAG_BYTES), 0
    while True:
        digest.update(chunk)
        following = f.read(segment + _TAG_BYTES)  # read ahead: the segment before EOF must carry the last flag
        try:
            parts.append(aead.decrypt(_nonce(prefix, index, not following), chunk, aad))
        except InvalidTag:
            raise IntegrityError(f"{label} fails its GCM tag (segment {index}): altered or truncated") from None
        if not following:
            return b"".join(parts), digest.hexdigest()
        chunk, index = following, index + 1


def rotate_master_key(root: str, old_key: MasterKey, new_key: MasterKey) -> List[Tuple[str, int]]:
    """Re-wrap the data key of every encrypted version under `root` from `old_key` to `new_key`.

    Only keys.json files are rewritten (each atomically); weights and manifests stay as they are, and so
    do their checksums. Versions already wrapped by `new_key` are skipped, so an interrupted rotation can
    simply be run again (as can one that overlapped a registration under the old key).
    Returns the (model, version) pairs re-wrapped. Raises MasterKeyError, before anything is written,
    when a version is wrapped by neither key; IntegrityError when a keys.json was altered.
    """
    registry = ModelRegistry(root)
    rewrap: List[Tuple[ModelVersion, bytes]] = []
    for model in registry.models():
        for number in registry.versions(model):
            version = registry.get(model, number)
            if "encryption" not in version.manifest:
                continue
            label = f"{model} v{number}"
            doc = _read_keys(version.url, label)
            if doc["master_key_id"] == new_key.key_id:
                continue
            rewrap.append((version, _unwrap(old_key, doc, model, number, label)))
    for version, data_key in rewrap:
        storage.write_bytes_atomic(storage.join(version.url, KEYS),
                                   _keys_doc(new_key, data_key, version.model, version.version))
    return [(version.model, version.version) for version, _ in rewrap]


def _keys_doc(master: MasterKey, data_key: bytes, model: str, version: int) -> bytes:
    nonce = secrets.token_bytes(12)
    wrapped = AESGCM(master.key).encrypt(nonce, data_key, _wrap_context(model, version, master.key_id))
    doc = {"scheme": "aes-256-gcm", "master_key_id": master.key_id,
           "nonce": base64.b64encode(nonce).decode(), "wrapped_key": base64.b64encode(wrapped).decode()}
    return json.dumps(doc, indent=2).encode()


def _read_keys(url: str, label: str) -> Dict[str, Any]:
    keys_url = storage.join(url, KEYS)
    if not storage.exists(keys_url):
        raise IntegrityError(f"{label} is encrypted but its {KEYS} is missing")
    try:
        doc = json.loads(storage.read_bytes(keys_url))
        return {k: doc[k] for k in ("master_key_id", "nonce", "wrapped_key")}
    except (ValueError, KeyError, TypeError):
        raise IntegrityError(f"{label}: {KEYS} is not a wrapped data key") from None


def _unwrap(master: MasterKey, doc: Mapping[str, Any], model: str, version: int, label: str) -> bytes:
    if doc["master_key_id"] != master.key_id:
        raise MasterKeyError(f"{label} was encrypted under master key {doc['master_key_id']}, but the key from "
                             f"{master.source} is {master.key_id}: wrong master key")
    try:
        nonce, wrapped = base64.b64decode(doc["nonce"]), base64.b64decode(doc["wrapped_key"])
        return AESGCM(master.key).decrypt(nonce, wrapped, _wrap_context(model, version, master.key_id))
    except (InvalidTag, binascii.Error, ValueError):
        raise IntegrityError(f"{label}: {KEYS} does not unwrap under its master key: altered") from None


def _context(model: str, version: int, name: str) -> bytes:
    # Bound into every tag: a ciphertext copied to another version or file name does not decrypt there.
    return f"orchestrator.registry weights\0{model}\0{version}\0{name}".encode()


def _wrap_context(model: str, version: int, key_id: str) -> bytes:
    return f"orchestrator.registry data key\0{model}\0{version}\0{key_id}".encode()


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + index.to_bytes(4, "big") + (b"\1" if last else b"\0")
