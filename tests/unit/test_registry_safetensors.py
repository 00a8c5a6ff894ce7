"""Registry weights as safetensors: bf16 bit for bit, memory-mapped loads, no pickle, old npz versions,
and extra files (a tokenizer) stored and verified with a version."""

from __future__ import annotations

import io
import json
import uuid
from typing import Dict

import numpy as np
import pytest
import safetensors
import torch

from orchestrator.config import ModelConfig, PipelineConfig, to_dict
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
from orchestrator.registry.servable import build_servable
from orchestrator.registry.tensors import torch_tensors
from orchestrator.training.models import build_model

INPUT_SHAPE = [1, 8, 8]


@pytest.fixture(params=["file", "memory"])
def root(request, tmp_path):
    if request.param == "file":
        yield tmp_path.as_uri()
        return
    url = f"memory://registry-st-{uuid.uuid4().hex}"  # the memory filesystem is process-wide
    yield url
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


@pytest.fixture
def registry(root):
    return ModelRegistry(root)


def _state():
    """Tensors of every kind a large model holds, as torch tensors (bf16 has no numpy dtype)."""
    g = torch.Generator().manual_seed(0)
    return {
        "embed.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "head.weight": torch.randn(3, 5, generator=g).to(torch.float16),
        "norm.weight": torch.randn(5, generator=g),
        "positions": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "codes": torch.tensor([-128, -1, 0, 1, 127], dtype=torch.int8),
        "steps": torch.tensor(11, dtype=torch.int64),  # 0-d stays 0-d
        "mask": torch.tensor([True, False, True]),
    }


def _register(registry, weights, **kwargs):
    return registry.register(
        "lm", weights, metrics={}, config={}, lineage={}, signature=signature_for([4], 2), **kwargs
    )


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().view(torch.uint8).numpy().tobytes() if tensor.dim() else _raw_bytes(tensor.reshape(1))


def _flip_byte(url: str, at: int) -> None:
    fs, path = storage.filesystem(url)
    data = bytearray(fs.cat_file(path))
    data[at] ^= 0xFF
    fs.pipe_file(path, bytes(data))


def test_every_dtype_round_trips_bit_for_bit(registry):
    state = _state()
    state["embed.weight"][0, 0] = float("nan")  # bits, not values: a NaN must come back as the same NaN
    registered = _register(registry, state)
    version, arrays = registry.load("lm", registered.version)

    assert version.weights_dtypes == {"embed.weight": "bfloat16"}
    assert version.manifest["weights"] == {
        "file": WEIGHTS, "format": "safetensors", "dtypes": {"embed.weight": "bfloat16"}
    }
    assert arrays["embed.weight"].dtype == np.uint16 and arrays["head.weight"].dtype == np.float16
    assert all(not a.flags.writeable for a in arrays.values())
    tensors = torch_tensors(arrays, version.weights_dtypes)
    assert sorted(tensors) == sorted(state)
    for name, expected in state.items():
        assert tensors[name].dtype == expected.dtype and tensors[name].shape == expected.shape, name
        assert _raw_bytes(tensors[name]) == _raw_bytes(expected), name
    assert torch.equal(tensors["positions"], state["positions"]) and torch.equal(tensors["codes"], state["codes"])


def test_numpy_arrays_register_as_before_and_mix_with_tensors(registry):
    weights = {"w": np.arange(6, dtype=np.float32).reshape(2, 3).T, "b": torch.ones(2, dtype=torch.bfloat16)}
    version, arrays = registry.load("lm", _register(registry, weights).version)
    assert np.array_equal(arrays["w"], weights["w"]) and arrays["w"].flags.c_contiguous  # transposed input
    assert version.weights_dtypes == {"b": "bfloat16"}


def test_loaded_bf16_weights_register_again_as_bf16(registry):
    first, arrays = registry.load("lm", _register(registry, _state()).version)
    again = _register(registry, torch_tensors(arrays, first.weights_dtypes))
    assert again.weights_dtypes == first.weights_dtypes and again.weights_sha256 == first.weights_sha256


def test_the_weights_file_is_plain_safetensors_with_a_json_header_and_nothing_else(registry):
    version = _register(registry, _state())
    blob = storage.read_bytes(storage.join(version.url, WEIGHTS))

    header_len = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8: 8 + header_len])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert {k: v["dtype"] for k, v in tensors.items()} == {
        "embed.weight": "BF16", "head.weight": "F16", "norm.weight": "F32", "positions": "I64", "codes": "I8",
        "steps": "I64", "mask": "BOOL",
    }
    assert tensors["steps"]["shape"] == []
    # Header plus the tensors' bytes is the whole file: there is no room for anything else.
    assert 8 + header_len + max(v["data_offsets"][1] for v in tensors.values()) == len(blob)
    loaded = safetensors.torch.load(blob)  # any safetensors reader reads it, bf16 as bf16
    assert loaded["embed.weight"].dtype == torch.bfloat16
    assert torch.equal(loaded["embed.weight"], _state()["embed.weight"])


@pytest.mark.parametrize("where", ["header", "data"])
def test_a_flipped_byte_in_the_weights_fails_to_load(registry, where):
    version = _register(registry, _state())
    url = storage.join(version.url, WEIGHTS)
    size = len(storage.read_bytes(url))
    _flip_byte(url, 20 if where == "header" else size - 3)

    assert registry.get("lm", version.version).version == version.version  # the manifest is intact
    with pytest.raises(IntegrityError, match=WEIGHTS):
        registry.load("lm", version.version)


def test_a_local_load_memory_maps_the_verified_file(tmp_path):
    registry = ModelRegistry(tmp_path.as_uri())
    version = _register(registry, {"big": torch.zeros(1 << 18, dtype=torch.float32)})
    _, arrays = registry.load("lm", version.version)
    path = storage.filesystem(storage.join(version.url, WEIGHTS))[1]
    with open("/proc/self/maps") as maps:
        assert path in maps.read()  # the arrays view the file's pages, not a private copy
    assert arrays["big"].shape == (1 << 18,) and not arrays["big"].any()


def test_manifest_and_file_dtypes_must_agree(tmp_path):
    registry = ModelRegistry(tmp_path.as_uri())
    version = _register(registry, _state())
    manifest = {**version.manifest, "weights": {"file": WEIGHTS, "format": "safetensors"}}  # drops the bf16 entry
    text = json.dumps(manifest, sort_keys=True).encode()
    storage.write_bytes_atomic(storage.join(version.url, MANIFEST_SUM), sha256(text).encode())
    storage.write_bytes_atomic(storage.join(version.url, MANIFEST), text)
    with pytest.raises(IntegrityError, match="dtypes"):
        registry.load("lm", version.version)


def _register_old_style(registry, weights) -> None:
    """Version 1 as registries wrote it before safetensors: weights.npz, no "weights" section."""
    buffer = io.BytesIO()
    np.savez(buffer, **weights)
    blob = buffer.getvalue()
    url = storage.join(registry.url, "digits", "versions", "1")
    manifest = {"model": "digits", "version": 1, "files": {LEGACY_WEIGHTS: sha256(blob)}, "metrics": {},
                "config": {}, "lineage": {}, "signature": signature_for([4], 2)}
    text = json.dumps(manifest, indent=2, sort_keys=True).encode()
    storage.write_bytes_atomic(storage.join(url, LEGACY_WEIGHTS), blob)
    storage.write_bytes_atomic(storage.join(url, MANIFEST_SUM), sha256(text).encode())
    storage.write_bytes_atomic(storage.join(url, MANIFEST), text)


def test_an_old_npz_version_still_loads_beside_new_ones(registry):
    old: Dict[str, np.ndarray] = {
        "w": np.arange(8, dtype=np.float32).reshape(2, 4), "steps": np.array([3], dtype=np.int64)
    }
    _register_old_style(registry, old)
    new = registry.register("digits", old, metrics={}, config={}, lineage={}, signature=signature_for([4], 2))

    version, arrays = registry.load("digits", 1)
    assert version.weights_file == LEGACY_WEIGHTS and version.weights_dtypes == {} and version.extra_files == []
    assert all(np.array_equal(arrays[k], v) and arrays[k].dtype == v.dtype for k, v in old.items())
    assert new.version == 2 and new.weights_file == WEIGHTS
    assert all(np.array_equal(registry.load("digits", 2)[1][k], v) for k, v in old.items())

    _flip_byte(storage.join(version.url, LEGACY_WEIGHTS), 40)
    with pytest.raises(IntegrityError, match=LEGACY_WEIGHTS):
        registry.load("digits", 1)


def _register_digits(model: torch.nn.Module, registry: ModelRegistry) -> int:
    cfg = PipelineConfig(model=ModelConfig(hidden=[32, 16]))
    return registry.register(
        "digits", model.state_dict(), metrics={}, config=to_dict(cfg), lineage={},
        signature=signature_for(INPUT_SHAPE, 10),
    ).version


def test_a_bf16_version_serves_what_the_eager_bf16_model_computes(tmp_path):
    registry = ModelRegistry(tmp_path.as_uri())
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=[32, 16]), INPUT_SHAPE, 10).to(torch.bfloat16).eval()
    number = _register_digits(model, registry)
    version, arrays = registry.load("digits", number)
    assert version.weights_dtypes and set(version.weights_dtypes.values()) == {"bfloat16"}

    x = torch.rand(5, 64)
    served = build_servable(version.manifest, arrays)(x)
    with torch.inference_mode():
        eager = model(x.to(torch.bfloat16)).float()
    assert served.dtype == torch.float32 and torch.equal(served, eager)


def test_extra_files_round_trip_and_are_verified(registry):
    tokenizer = json.dumps({"model": {"type": "BPE", "vocab": {"a": 0}}}).encode()
    files = {"tokenizer.json": tokenizer, "vocab.txt": b"a\nb\n"}
    version = _register(registry, _state(), files=files)

    assert version.extra_files == ["tokenizer.json", "vocab.txt"]
    assert version.manifest["files"]["tokenizer.json"] == sha256(tokenizer)
    assert registry.read_file("lm", "latest", "tokenizer.json") == tokenizer
    assert registry.read_file("lm", version.version, "vocab.txt") == b"a\nb\n"
    with pytest.raises(RegistryError, match="no file"):
        registry.read_file("lm", version.version, "merges.txt")

    _flip_byte(storage.join(version.url, "tokenizer.json"), 3)
    with pytest.raises(IntegrityError, match="tokenizer.json"):
        registry.read_file("lm", version.version, "tokenizer.json")
    registry.load("lm", version.version)  # the weights are still intact


@pytest.mark.parametrize("name", [WEIGHTS, LEGACY_WEIGHTS, MANIFEST, MANIFEST_SUM, "a/b", "../up", ""])
def test_extra_files_may_not_take_reserved_or_unsafe_names(registry, name):
    with pytest.raises(RegistryError, match="file name"):
        _register(registry, _state(), files={name: b"x"})
    assert registry.versions("lm") == []


def test_a_version_whose_extra_file_was_written_but_not_its_manifest_is_unfinished(registry):
    storage.write_bytes_atomic(storage.join(registry.url, "lm", "versions", "1", "tokenizer.json"), b"{}")
    assert registry.versions("lm") == []
    assert _register(registry, _state(), files={"tokenizer.json": b"{}"}).version == 2
