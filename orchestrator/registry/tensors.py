"""Registry weights in memory and on disk: numpy arrays and safetensors files, bf16 included.

In memory, weights are a `Dict[str, np.ndarray]`: what `ModelRegistry.load` returns, what serving puts
in the object store once and every replica views zero-copy. numpy has no bfloat16, so a bf16 tensor
travels as a uint16 array holding the same bits (its *carrier*), and a dtype map names what each
carrier really holds: `{name: "bfloat16"}`, only for such tensors, recorded in the version's manifest
(`manifest["weights"]["dtypes"]`). `torch_tensors(arrays, dtypes)` views the arrays back as torch
tensors of their real dtypes without copying (`torch.from_numpy(a).view(torch.bfloat16)`). Every
other dtype (fp32, fp16, int64, int8, bool, ...) is its own numpy dtype and needs no entry.

On disk a version's weights are one safetensors file with the real dtypes in its header (BF16 for
bf16): a JSON header and raw little-endian bytes, nothing to unpickle, readable by any safetensors
reader. Shapes round-trip exactly, 0-d tensors included.
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import safetensors
import safetensors.torch
import torch

CARRIERS: Dict[torch.dtype, torch.dtype] = {torch.bfloat16: torch.uint16}
"""Dtypes numpy cannot hold -> the integer dtype of the same width that carries their bits."""

_BY_NAME: Dict[str, torch.dtype] = {str(dtype).removeprefix("torch."): dtype for dtype in CARRIERS}


def to_arrays(weights: Mapping[str, Any]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Numpy arrays of `weights` (numpy arrays or torch tensors of any dtype) and their dtype map.

    Arrays already C-contiguous are used as they are (no copy); tensors are viewed where they allow it.
    A numpy uint16 array stays uint16: to store carriers as bf16 again, pass `torch_tensors(arrays, dtypes)`.
    """
    arrays: Dict[str, np.ndarray] = {}
    dtypes: Dict[str, str] = {}
    for name, value in weights.items():
        if isinstance(value, np.ndarray):
            if value.dtype.byteorder == ">":  # safetensors holds little-endian bytes
                value = value.astype(value.dtype.newbyteorder("<"))
            # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
            arrays[name] = value if value.flags.c_contiguous else value.copy(order="C")
            continue
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype in CARRIERS:
            dtypes[name] = str(tensor.dtype).removeprefix("torch.")
            tensor = tensor.view(CARRIERS[tensor.dtype])
        arrays[name] = tensor.numpy()
    return arrays, dtypes


def torch_view(array: np.ndarray, dtype: Optional[str] = None) -> torch.Tensor:
    """A tensor on `array`'s memory (no copy), of the real `dtype` its carrier holds (None: its own)."""
    with warnings.catch_warnings():
        # Shared arrays are read-only on purpose; the tensors viewing them are never written.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        tensor = torch.from_numpy(array)
    if dtype is None:
        return tensor
    if dtype not in _BY_NAME:
        raise ValueError(f"unknown carried dtype {dtype!r} (known: {sorted(_BY_NAME)})")
    return tensor.view(_BY_NAME[dtype])


def torch_tensors(arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> Dict[str, torch.Tensor]:
    """`torch_view` of every array: the weights as torch tensors of their real dtypes, zero-copy."""
    return {name: torch_view(array, dtypes.get(name)) for name, array in arrays.items()}


def to_safetensors(arrays: Mapping[str, np.ndarray], dtypes: Mapping[str, str]) -> bytes:
    """The safetensors file of `arrays` (from `to_arrays`), carriers written as their real dtypes."""
    specs = {
        name: safetensors.TensorSpec(
            dtype=dtypes.get(name, array.dtype.name),
            shape=array.shape,
            data_ptr=array.ctypes.data,
            data_len=array.nbytes,
        )
        for name, array in arrays.items()
    }
    # `arrays` stays referenced until serialize returns: the specs hold raw pointers into it.
    return bytes(safetensors.serialize(specs))


def from_safetensors(data: bytes) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Arrays (read-only) and dtype map of a safetensors file held in memory."""
    return _read_only(*to_arrays(safetensors.torch.load(data)))


def load_safetensors_file(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Arrays (read-only) and dtype map of a local safetensors file, memory-mapped: no tensor is read
    into private memory until it is touched, and pages come from the OS page cache.

    The mapping is private (copy-on-write), so nothing written to the arrays could reach the file;
    they are marked read-only anyway, like the object-store views serving hands out.
    """
    with safetensors.safe_open(path, framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return _read_only(*to_arrays(tensors))


def _read_only(arrays: Dict[str, np.ndarray], dtypes: Dict[str, str]) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    for array in arrays.values():
        array.flags.writeable = False
    return arrays, dtypes
