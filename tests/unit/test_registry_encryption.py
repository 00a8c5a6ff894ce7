"""Weights encrypted at rest (`registry.encryption`): no plaintext parameter bytes in storage, exact
round trips, clear errors for a missing or wrong master key, tamper detection, and key rotation."""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from orchestrator.config import EncryptionConfig, PipelineConfig, StorageConfig, to_config
from orchestrator.registry import (
    MANIFEST,
    MANIFEST_SUM,
    WEIGHTS,
    IntegrityError,
    MasterKey,
    MasterKeyError,
    ModelRegistry,
    crypto,
    new_master_key,
    registry_for,
    rotate_master_key,
    sha256,
    signature_for,
    storage,
    weights_to_bytes,
)

ENV = "ORCHESTRATOR_MASTER_KEY"
ON = EncryptionConfig(enabled=True)


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path):
    if request.param == "file":
        yield tmp_path.as_uri()
        return
    url = f"memory://encryption-test-{uuid.uuid4().hex}"  # the memory filesystem is process-wide
    yield url
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def key(monkeypatch) -> str:
    value = new_master_key()
    monkeypatch.setenv(ENV, value)
    return value


def _weights() -> Dict[str, Any]:
    # Distinctive values: their raw bytes cannot occur in storage by chance.
    return {
        "stages.block0.0.weight": (np.arange(256, dtype=np.float32) * np.float32(np.pi) + 1e-3).reshape(16, 16),
        "stages.block0.0.bias": np.linspace(-7.25, 9.5, 64, dtype=np.float32),
        "head.weight": torch.linspace(-3, 3, 48, dtype=torch.bfloat16).reshape(6, 8),
        "steps": np.array([7, 8], dtype=np.int64),
    }


def _register(registry: ModelRegistry, model: str = "digits", files=None):
    return registry.register(model, _weights(), metrics={"val_accuracy": 0.5}, config={}, lineage={},
                             signature=signature_for([4, 4], 2), files=files)


def _snapshot(root: str) -> Dict[str, bytes]:
    """Every file under `root`, recursively, by path."""
    fs, path = storage.filesystem(root)
    return {p: fs.cat_file(p) for p in fs.find(path)}


def _secrets() -> List[bytes]:
    """Byte strings that must not be in storage: each array's raw bytes and windows of the safetensors file."""
    weights = _weights()
    encoded = weights_to_bytes(weights)
    raw = [np.ascontiguousarray(a).tobytes() for a in weights.values() if isinstance(a, np.ndarray) and a.size > 8]
    return raw + [encoded[i:i + 64] for i in range(len(encoded) // 2, len(encoded) - 64, 97)]


def test_no_plaintext_weight_bytes_reach_storage(root, key, monkeypatch):
    written: List[bytes] = []  # what every atomic write received: its temp file on a local root holds this
    real_write = storage.write_bytes_atomic

    def recording_write(url: str, data: bytes) -> None:
        written.append(data)
        real_write(url, data)

    monkeypatch.setattr(storage, "write_bytes_atomic", recording_write)
    version = _register(ModelRegistry(root, encryption=ON), files={"tokenizer.json": b'{"kept": "in the clear"}'})

    files = _snapshot(root)
    assert any(p.endswith(f"/{WEIGHTS}") for p in files) and any(p.endswith("/keys.json") for p in files)
    assert not any(".tmp-" in p for p in files)
    for blob in [*files.values(), *written]:
        for secret in _secrets():
            assert secret not in blob
        assert key.encode() not in blob and MasterKey.from_base64(key, "test").key not in blob
    assert version.manifest["encryption"]["files"] == [WEIGHTS]
    assert ModelRegistry(root).read_file("digits", 1, "tokenizer.json") == b'{"kept": "in the clear"}'


def test_encrypted_weights_load_exactly(root, key):
    _register(ModelRegistry(root, encryption=ON))
    version, arrays = ModelRegistry(root).load("digits", 1)  # decryption needs the key, not `enabled`
    expected = _weights()
    assert set(arrays) == set(expected)
    for name, value in expected.items():
        want = value.view(torch.uint16).numpy() if isinstance(value, torch.Tensor) else value
        np.testing.assert_array_equal(arrays[name], want)
        assert arrays[name].dtype == want.dtype
    assert version.weights_dtypes == {"head.weight": "bfloat16"}
    assert ModelRegistry(root).read_file("digits", 1, WEIGHTS) == weights_to_bytes(expected)


def test_a_wrong_key_fails_cleanly_and_changes_nothing(root, key, monkeypatch):
    _register(ModelRegistry(root, encryption=ON))
    before = _snapshot(root)
    monkeypatch.setenv(ENV, new_master_key())
    with pytest.raises(MasterKeyError, match=f"digits v1 was encrypted under master key .* \\${ENV} .*wrong master"):
        ModelRegistry(root).load("digits", 1)
    assert _snapshot(root) == before


def test_a_missing_key_fails_cleanly_naming_its_source(root, key, monkeypatch, tmp_path):
    _register(ModelRegistry(root, encryption=ON))
    before = _snapshot(root)
    monkeypatch.delenv(ENV)
    with pytest.raises(MasterKeyError, match=f"digits v1 is encrypted at rest.*{ENV}"):
        ModelRegistry(root).load("digits", 1)
    missing_file = EncryptionConfig(key_file=str(tmp_path / "absent.key"))
    with pytest.raises(MasterKeyError, match="absent.key"):
        ModelRegistry(root, encryption=missing_file).load("digits", 1)
    with pytest.raises(MasterKeyError, match=ENV):  # writing: refused before a version is claimed
        _register(ModelRegistry(root, encryption=ON))
    assert _snapshot(root) == before and ModelRegistry(root).versions("digits") == [1]


def test_a_malformed_key_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.setenv(ENV, "bm90LWEta2V5")  # base64 of 9 bytes
    with pytest.raises(MasterKeyError, match=f"\\${ENV} must be 32 bytes, got 9") as err:
        MasterKey.from_config(ON)
    assert "bm90LWEta2V5" not in str(err.value)
    monkeypatch.setenv(ENV, "not base64 at all!")
    with pytest.raises(MasterKeyError, match="not base64"):
        MasterKey.from_config(ON)


def test_a_key_file_works_like_the_variable(tmp_path, monkeypatch):
    key_file = tmp_path / "master.key"
    key_file.write_text(new_master_key() + "\n")
    monkeypatch.delenv(ENV, raising=False)
    cfg = EncryptionConfig(enabled=True, key_file=str(key_file))
    root = (tmp_path / "store").as_uri()
    _register(ModelRegistry(root, encryption=cfg))
    _, arrays = ModelRegistry(root, encryption=cfg).load("digits", 1)
    np.testing.assert_array_equal(arrays["steps"], [7, 8])


def test_a_flipped_ciphertext_byte_is_detected(root, key):
    version = _register(ModelRegistry(root, encryption=ON))
    url = storage.join(version.url, WEIGHTS)
    fs, path = storage.filesystem(url)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    fs.pipe_file(path, bytes(data))
    with pytest.raises(IntegrityError, match=WEIGHTS):
        ModelRegistry(root).load("digits", 1)
    _rewrite_checksums(version.url, WEIGHTS, bytes(data))  # an attacker who also fixes the checksums
    with pytest.raises(IntegrityError, match="GCM tag"):
        ModelRegistry(root).load("digits", 1)


def test_truncated_or_transplanted_ciphertext_does_not_decrypt(tmp_path, key, monkeypatch):
    monkeypatch.setattr(crypto, "SEGMENT_BYTES", 256)  # many segments from small weights
    root = tmp_path.as_uri()
    registry = ModelRegistry(root, encryption=ON)
    first, second = _register(registry), _register(registry)
    _, arrays = registry.load("digits", 1)  # the segmented file round-trips
    np.testing.assert_array_equal(arrays["stages.block0.0.bias"], _weights()["stages.block0.0.bias"])

    cipher = storage.read_bytes(storage.join(first.url, WEIGHTS))
    truncated = cipher[:-(256 + 16)]  # a whole segment dropped: the new last one lacks the last flag
    _rewrite_checksums(first.url, WEIGHTS, truncated)
    with pytest.raises(IntegrityError, match="GCM tag"):
        registry.load("digits", 1)
    # v1's keys and weights copied onto v2: bound to v1, they do not open as v2.
    for name in ("keys.json", WEIGHTS):
        storage.write_bytes_atomic(storage.join(second.url, name), storage.read_bytes(storage.join(first.url, name)))
    _rewrite_checksums(second.url, WEIGHTS, truncated)
    with pytest.raises(IntegrityError):
        registry.load("digits", 2)


def test_rotation_rewraps_keys_and_leaves_weights_alone(root, key, monkeypatch):
    registry = ModelRegistry(root, encryption=ON)
    _register(registry), _register(registry), _register(registry, model="other")
    _register(ModelRegistry(root))  # v3 of digits in the clear: rotation skips it
    before = _snapshot(root)
    old, new = MasterKey.from_base64(key, "old"), MasterKey.from_base64(new_master_key(), "new")

    assert rotate_master_key(root, old, new) == [("digits", 1), ("digits", 2), ("other", 1)]
    after = _snapshot(root)
    changed = {p for p in before if before[p] != after[p]}
    assert set(after) == set(before) and changed == {p for p in before if p.endswith("/keys.json")}
    assert len(changed) == 3
    with pytest.raises(MasterKeyError, match="wrong master key"):
        ModelRegistry(root).load("digits", 1)
    monkeypatch.setenv(ENV, base64.b64encode(new.key).decode())
    for model, number in [("digits", 1), ("digits", 2), ("other", 1), ("digits", 3)]:
        _, arrays = ModelRegistry(root).load(model, number)
        np.testing.assert_array_equal(arrays["steps"], [7, 8])
    assert rotate_master_key(root, old, new) == []  # done already: a rerun changes nothing


def test_rotation_with_the_wrong_old_key_writes_nothing(root, key):
    _register(ModelRegistry(root, encryption=ON))
    before = _snapshot(root)
    stranger, new = (MasterKey.from_base64(new_master_key(), name) for name in ("stranger", "new"))
    with pytest.raises(MasterKeyError, match="digits v1.*wrong master key"):
        rotate_master_key(root, stranger, new)
    assert _snapshot(root) == before


def test_a_registry_without_encryption_reads_and_writes_as_before(root, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    registry = ModelRegistry(root)
    version = _register(registry)
    assert "encryption" not in version.manifest
    assert not storage.exists(storage.join(version.url, "keys.json"))
    plain = storage.read_bytes(storage.join(version.url, WEIGHTS))
    assert plain == weights_to_bytes(_weights())
    assert all(secret in plain for secret in _secrets())  # what the no-plaintext test searches for is findable
    _, arrays = registry.load("digits", 1)
    np.testing.assert_array_equal(arrays["steps"], [7, 8])


def test_registry_for_passes_the_config_and_fields_are_checked(tmp_path):
    cfg = to_config({"storage": {"root": str(tmp_path)}, "registry": {"encryption": {"enabled": True}}})
    assert registry_for(cfg).encryption == EncryptionConfig(enabled=True)
    assert registry_for(PipelineConfig(storage=StorageConfig(root=str(tmp_path)))).encryption.enabled is False
    with pytest.raises(ValueError, match="registry.encryption.key_env"):
        EncryptionConfig(key_env="1-bad")
    with pytest.raises(ValueError, match="registry.encryption.key_env"):
        EncryptionConfig(key_env="")
    with pytest.raises(ValueError, match="storage.s3_sse"):
        StorageConfig(s3_sse="aes256")
    with pytest.raises(ValueError, match="storage.s3_sse_kms_key_id"):
        StorageConfig(s3_sse="AES256", s3_sse_kms_key_id="alias/x")


def _rewrite_checksums(version_url: str, name: str, blob: bytes) -> None:
    """Write `blob` as file `name` and make the manifest and its checksum agree with it."""
    storage.write_bytes_atomic(storage.join(version_url, name), blob)
    manifest = json.loads(storage.read_bytes(storage.join(version_url, MANIFEST)))
    manifest["files"][name] = sha256(blob)
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_bytes_atomic(storage.join(version_url, MANIFEST), text)
    storage.write_bytes_atomic(storage.join(version_url, MANIFEST_SUM), sha256(text).encode())


def test_the_registry_tool_rekeys_every_encrypted_version(tmp_path, key, monkeypatch, capsys):
    from jobs.registry import main

    root = tmp_path.as_uri()
    _register(ModelRegistry(root, encryption=ON))
    new = new_master_key()
    monkeypatch.setenv("ORC_NEW_KEY", new)
    assert main(["--root", root, "--json", "rekey", "--new-env", "ORC_NEW_KEY"]) == 0
    assert json.loads(capsys.readouterr().out) == {"rewrapped": [{"model": "digits", "version": 1}]}
    monkeypatch.setenv(ENV, new)  # the new key opens it now, the old one no longer does
    _, arrays = ModelRegistry(root).load("digits", 1)
    np.testing.assert_array_equal(arrays["steps"], [7, 8])
    monkeypatch.setenv(ENV, key)
    with pytest.raises(MasterKeyError):
        ModelRegistry(root).load("digits", 1)
    monkeypatch.delenv("ORC_NEW_KEY")
    assert main(["--root", root, "rekey", "--new-env", "ORC_NEW_KEY"]) == 1  # a missing key is a clear error
    assert "ORC_NEW_KEY" in capsys.readouterr().err
