"""Encrypted weights where the rest of the system meets them: on S3 (against the S3-compatible server,
with server-side encryption passed through from `storage.s3_sse`) and in serving's object-store holder
(`serve.weights.weights_ref`, a real Ray actor that decrypts with the key it reads itself)."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import ray

from orchestrator.config import to_config
from orchestrator.registry import (
    WEIGHTS,
    MasterKeyError,
    ModelRegistry,
    new_master_key,
    registry_for,
    storage,
    weights_to_bytes,
)
from serve.names import NAMESPACE
from serve.weights import weights_holder_name, weights_ref
from tests.unit.test_registry_encryption import _register, _weights

ENV = "ORCHESTRATOR_MASTER_KEY"


@pytest.mark.parametrize("sse, kms_key", [("AES256", ""), ("aws:kms", "alias/orchestrator-registry")])
def test_s3_objects_carry_server_side_encryption_and_no_plaintext(s3_server, monkeypatch, sse, kms_key):
    monkeypatch.setenv(ENV, new_master_key())
    prefix = f"encryption-{uuid.uuid4().hex[:8]}"
    cfg = to_config({
        "storage": {"root": f"s3://{s3_server.bucket}/{prefix}", "s3_sse": sse, "s3_sse_kms_key_id": kms_key},
        "registry": {"encryption": {"enabled": True}},
    })
    try:
        _register(registry_for(cfg), files={"tokenizer.json": b"{}"})
        registry_for(cfg).set_alias("digits", "production", 1)
    finally:
        storage.use_s3_server_side_encryption("")  # the process-wide setting ends with the test
    client, keys = s3_server.client(), s3_server.keys(prefix)
    assert {k.rsplit("/", 1)[-1] for k in keys} >= {WEIGHTS, "keys.json", "manifest.json", "aliases.json"}
    plaintext = weights_to_bytes(_weights())
    for key in keys:
        head = client.head_object(Bucket=s3_server.bucket, Key=key)
        assert head["ServerSideEncryption"] == sse, key
        assert head.get("SSEKMSKeyId", "") == kms_key, key
        body = s3_server.read(key)
        assert plaintext[-256:] not in body and _weights()["stages.block0.0.bias"].tobytes() not in body
    _, arrays = ModelRegistry(cfg.storage.root).load("digits", "production")  # read back from S3, in memory
    np.testing.assert_array_equal(arrays["stages.block0.0.bias"], _weights()["stages.block0.0.bias"])


@pytest.mark.slow
def test_weights_holder_serves_encrypted_weights_and_refuses_a_wrong_key(ray_cluster, tmp_path):
    key_file, wrong_file = tmp_path / "master.key", tmp_path / "wrong.key"
    key_file.write_text(new_master_key())
    wrong_file.write_text(new_master_key())
    root = str(tmp_path / "store")
    encryption = {"enabled": True, "key_file": str(key_file)}
    cfg = to_config({"storage": {"root": root}, "registry": {"encryption": encryption}})
    version = _register(registry_for(cfg))
    wrong = to_config({"storage": {"root": root}, "registry": {"encryption": {"key_file": str(wrong_file)}}})
    try:
        arrays = ray.get(weights_ref(cfg.storage.root, version, cfg.registry.encryption))
        for name in ("stages.block0.0.weight", "stages.block0.0.bias", "steps"):
            np.testing.assert_array_equal(arrays[name], _weights()[name])
        # The holder decrypts on every call, so a wrong key fails even while a copy is held.
        with pytest.raises(MasterKeyError, match="wrong master key"):
            weights_ref(cfg.storage.root, version, wrong.registry.encryption)
    finally:
        ray.kill(ray.get_actor(weights_holder_name(version), namespace=NAMESPACE))
