"""The model registry on a local folder and on an object-store-like filesystem (memory://)."""

from __future__ import annotations

import json
import os
import uuid

import numpy as np
import pytest

from orchestrator.registry import (
    LEGACY_WEIGHTS,
    MANIFEST,
    MANIFEST_SUM,
    WEIGHTS,
    IntegrityError,
    ModelRegistry,
    RegistryError,
    sha256,
    signature_for,
    storage,
)


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path):
    if request.param == "file":
        yield tmp_path.as_uri()
        return
    url = f"memory://registry-test-{uuid.uuid4().hex}"  # the memory filesystem is process-wide
    yield url
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def registry(root):
    return ModelRegistry(root)


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    return {
        "stages.block0.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "stages.block0.0.bias": rng.normal(size=4).astype(np.float64),
        "head.weight": rng.normal(size=(2, 4)).astype(np.float16),
        "steps": np.array([7, 8], dtype=np.int64),
    }


def _register(registry, model: str = "digits", seed: int = 0, accuracy: float = 0.5):
    return registry.register(
        model, _weights(seed), metrics={"val_accuracy": accuracy}, config={"train": {"lr": 0.01}},
        lineage={"dataset": "abc"}, signature=signature_for([1, 2, 2], 2),
    )


def _flip_byte(url: str) -> None:
    fs, path = storage.filesystem(url)
    data = bytearray(fs.cat_file(path))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_registering_twice_gives_versions_1_and_2(registry):
    first, second = _register(registry, seed=0), _register(registry, seed=1)
    assert (first.version, second.version) == (1, 2)
    assert registry.versions("digits") == [1, 2]
    assert registry.models() == ["digits"]
    assert registry.versions("unknown") == []


def test_load_round_trips_weights_exactly_and_keeps_the_manifest(registry):
    _register(registry, seed=0)
    _register(registry, seed=1, accuracy=0.75)
    version, loaded = registry.load("digits", 2)

    expected = _weights(1)
    assert sorted(loaded) == sorted(expected)
    for name, array in expected.items():
        assert loaded[name].dtype == array.dtype, name
        assert np.array_equal(loaded[name], array), name
    assert not np.array_equal(registry.load("digits", 1)[1]["head.weight"], expected["head.weight"])
    assert version.metrics == {"val_accuracy": 0.75}
    assert version.signature == signature_for([1, 2, 2], 2)
    assert version.manifest["lineage"] == {"dataset": "abc"} and version.manifest["config"] == {"train": {"lr": 0.01}}


def test_aliases_resolve_to_versions(registry):
    _register(registry)
    _register(registry)
    registry.set_alias("digits", "production", 1)
    registry.set_alias("digits", "candidate", "latest")

    assert registry.resolve("digits", "production") == 1
    assert registry.resolve("digits", "candidate") == 2
    assert registry.resolve("digits", "latest") == 2
    assert registry.resolve("digits", 1) == 1 and registry.resolve("digits", "2") == 2

    registry.set_alias("digits", "staging", "production")  # an alias may be set from another alias
    registry.set_alias("digits", "production", 2)  # moving an alias leaves the others alone
    assert registry.aliases("digits") == {"production": 2, "candidate": 2, "staging": 1}
    assert registry.get("digits", "production").version == 2


@pytest.mark.parametrize("ref", ["nonexistent", 3, "3", 0])
def test_resolving_an_unknown_alias_or_version_raises(registry, ref):
    _register(registry)
    _register(registry)
    with pytest.raises(RegistryError):
        registry.resolve("digits", ref)


def test_a_model_without_versions_resolves_nothing(registry):
    with pytest.raises(RegistryError, match="no versions"):
        registry.resolve("digits", "latest")


def test_set_alias_to_an_unknown_version_leaves_aliases_unchanged(registry):
    _register(registry)
    registry.set_alias("digits", "production", 1)
    with pytest.raises(RegistryError):
        registry.set_alias("digits", "production", 5)
    assert registry.aliases("digits") == {"production": 1}


def test_tampered_weights_fail_to_load(registry):
    version = _register(registry)
    _flip_byte(storage.join(version.url, WEIGHTS))

    assert registry.get("digits", 1).version == 1  # the manifest itself is intact
    with pytest.raises(IntegrityError, match=WEIGHTS):
        registry.load("digits", 1)


def test_tampered_manifest_fails_get_and_load(registry):
    version = _register(registry, accuracy=0.5)
    url = storage.join(version.url, MANIFEST)
    text = storage.read_bytes(url).decode()
    assert '"val_accuracy": 0.5' in text
    storage.write_bytes_atomic(url, text.replace('"val_accuracy": 0.5', '"val_accuracy": 0.99').encode())

    with pytest.raises(IntegrityError, match=MANIFEST):
        registry.get("digits", 1)
    with pytest.raises(IntegrityError):
        registry.load("digits", 1)


def test_unfinished_version_is_skipped_and_its_number_not_reused(registry):
    _register(registry)
    # A writer that crashed after its weights, before its manifest.
    storage.write_bytes_atomic(storage.join(registry.url, "digits", "versions", "2", WEIGHTS), b"partial")

    assert registry.versions("digits") == [1]
    assert registry.resolve("digits", "latest") == 1
    with pytest.raises(RegistryError):
        registry.resolve("digits", 2)

    assert _register(registry).version == 3
    assert registry.versions("digits") == [1, 3]


class _MakesADirectoryWhenUnpickled:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_load_refuses_pickled_object_arrays(registry, tmp_path):
    marker = tmp_path / "unpickled"
    payload = np.empty(1, dtype=object)
    payload[0] = _MakesADirectoryWhenUnpickled(str(marker))
    blob_path = tmp_path / "evil.npz"
    np.savez(blob_path, weights=payload)  # object arrays are stored pickled
    blob = blob_path.read_bytes()

    # A version in the old npz layout whose manifest vouches for the file, as a writer with access to the
    # store could make (new versions are safetensors, which has no way to hold a pickle).
    url = storage.join(registry.url, "digits", "versions", "1")
    manifest = json.dumps(
        {"model": "digits", "version": 1, "files": {LEGACY_WEIGHTS: sha256(blob)}}, sort_keys=True
    ).encode()
    storage.write_bytes_atomic(storage.join(url, LEGACY_WEIGHTS), blob)
    storage.write_bytes_atomic(storage.join(url, MANIFEST_SUM), sha256(manifest).encode())
    storage.write_bytes_atomic(storage.join(url, MANIFEST), manifest)

    with pytest.raises(ValueError, match="allow_pickle"):
        registry.load("digits", 1)
    assert not marker.exists()

    # The payload is live: unpickling it (what load must never do) runs its code.
    with np.load(blob_path, allow_pickle=True) as archive:
        archive["weights"]
    assert marker.exists()


@pytest.mark.parametrize("name", ["", "has space", "a/b", "../escape", "..", "."])
def test_invalid_model_names_are_rejected(registry, name):
    with pytest.raises(RegistryError, match="invalid model name"):
        _register(registry, model=name)
    assert registry.models() == []


@pytest.mark.parametrize("alias", ["", "two words", "a/b", ".."])
def test_invalid_aliases_are_rejected(registry, alias):
    _register(registry)
    with pytest.raises(RegistryError, match="invalid alias"):
        registry.set_alias("digits", alias, 1)
    assert registry.aliases("digits") == {}


def test_numeric_alias_is_rejected(registry):
    _register(registry)
    _register(registry)
    with pytest.raises(RegistryError, match="number"):
        registry.set_alias("digits", "1", 2)
    assert registry.aliases("digits") == {}
    assert registry.resolve("digits", "1") == 1
