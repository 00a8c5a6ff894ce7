"""Tensor data of the Open Inference Protocol v2: its datatypes and their two wire forms, JSON values
and the raw little-endian bytes of the binary tensor data extension, to and from numpy arrays.

Pure: no HTTP, no signature. A malformed tensor raises `TensorError`, whose message the protocol
layer prefixes with the tensor's name.
"""

import math
import struct
from dataclasses import dataclass
from typing import Any, FrozenSet, List, Sequence, Union

import numpy as np

_JSON_TYPES = {str: "a string", type(None): "null", bool: "a boolean", dict: "an object", list: "an array"}
_LENGTH = struct.Struct("<I")  # the 4-byte little-endian length before each binary BYTES element


class TensorError(ValueError):
    """Tensor data that does not fit its datatype or shape; the message says how."""


@dataclass(frozen=True)
class Datatype:
    """One datatype of the protocol and how each wire form maps to numpy."""

    name: str
    """The protocol's name: "FP32", "INT64", "BYTES", ..."""
    wire: np.dtype
    """One element in binary form (little-endian); BF16 is its raw uint16 bits, BYTES is object."""
    array: np.dtype
    """The dtype of the array a model gets: the wire dtype, except BF16 -> float32 (numpy has no bf16)."""
    json_types: FrozenSet[type]
    """The Python types a JSON value of this datatype may parse to."""
    json_noun: str
    """What the JSON values are called in error messages."""

    @property
    def is_float(self) -> bool:
        return self.array.kind == "f"


def _datatype(name: str, wire: str, array: str = "", json_types: FrozenSet[type] = frozenset({int}),
              json_noun: str = "integers") -> Datatype:
    return Datatype(name, np.dtype(wire), np.dtype(array or wire), json_types, json_noun)


_NUMBERS = frozenset({int, float})
DATATYPES = {
    d.name: d for d in (
        _datatype("BOOL", "?", json_types=frozenset({bool}), json_noun="booleans"),
        *(_datatype(f"UINT{8 * size}", f"<u{size}") for size in (1, 2, 4, 8)),
        *(_datatype(f"INT{8 * size}", f"<i{size}") for size in (1, 2, 4, 8)),
        _datatype("FP16", "<f2", json_types=_NUMBERS, json_noun="numbers"),
        _datatype("FP32", "<f4", json_types=_NUMBERS, json_noun="numbers"),
        _datatype("FP64", "<f8", json_types=_NUMBERS, json_noun="numbers"),
        _datatype("BF16", "<u2", "<f4", json_types=_NUMBERS, json_noun="numbers"),
        _datatype("BYTES", "O", json_types=frozenset({str}), json_noun="strings"),
    )
}
"""Every datatype of the Open Inference Protocol, by name."""


def json_type(value: Any) -> str:
    """How a parsed JSON value is called in an error message: "a string", "a number", ..."""
    return _JSON_TYPES.get(type(value), "a number")


# -- JSON ------------------------------------------------------------------------------------------

def from_json(data: Any, shape: Sequence[int], datatype: Datatype) -> np.ndarray:
    """The array of `shape` in `datatype.array` held by the JSON `data` of a tensor: flat (row
    major) or nested to match `shape`. BYTES strings become UTF-8 `bytes` in an object array."""
    if not isinstance(data, list):
        raise TensorError(f"data must be an array of {datatype.json_noun}, got {json_type(data)}")
    if data and type(data[0]) is list:
        flat: list = []
        _flatten_nested(data, list(shape), flat)
    else:
        flat = data
    needed = math.prod(shape)
    if len(flat) != needed:
        raise TensorError(f"data holds {len(flat)} values but shape {list(shape)} needs {needed}")
    # One C-level pass over the types: a per-value isinstance loop costs more than the conversion.
    # bool is its own type here, so true/false never pass for numbers.
    if not set(map(type, flat)) <= datatype.json_types:
        bad = next(v for v in flat if type(v) not in datatype.json_types)
        raise TensorError(f"data must hold only {datatype.json_noun}, found {json_type(bad)} {repr(bad):.40}")
    return _json_values(flat, datatype).reshape(shape)


def _flatten_nested(data: list, shape: List[int], out: list) -> None:
    if len(data) != shape[0]:
        raise TensorError(f"nested data must match its shape: found {len(data)} items where {shape[0]} were expected")
    if len(shape) == 1:
        out.extend(data)
        return
    for item in data:
        if not isinstance(item, list):
            raise TensorError(f"nested data must match its shape: found {json_type(item)} where an array was expected")
        _flatten_nested(item, shape[1:], out)


def _json_values(flat: list, datatype: Datatype) -> np.ndarray:
    if datatype.name == "BYTES":
        return _object_array([_utf8(v) for v in flat])
    if not datatype.is_float:
        try:
            return np.asarray(flat, dtype=datatype.array)
        except OverflowError:
            raise TensorError(f"data holds an integer out of the range of {datatype.name}") from None
    try:
        with np.errstate(over="ignore"):  # overflow becomes inf, which the caller accepts or refuses
            return np.asarray(flat, dtype=datatype.array)
    except OverflowError:  # an integer too large for any float: to a float datatype it is an infinity
        return np.asarray([_capped(v) for v in flat], dtype=datatype.array)


def _capped(value: Union[int, float]) -> float:
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON escapes can spell
        raise TensorError(f"data holds a string that is not valid Unicode: {text!r:.40}") from None


def _object_array(items: list) -> np.ndarray:
    array = np.empty(len(items), dtype=object)
    array[:] = items
    return array


def to_json(array: np.ndarray, datatype: Datatype) -> Union[np.ndarray, List[str]]:
    """The flat JSON data of `array` as `datatype`: a C-contiguous numpy array orjson writes as it
    is, or for BYTES a list of strings. Raises TensorError for BYTES that are not UTF-8."""
    if datatype.name == "BYTES":
        try:
            return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        except UnicodeDecodeError:
            raise TensorError("holds bytes that are not UTF-8, which JSON cannot carry") from None
    if datatype.name == "BF16":  # the values a BF16 tensor holds, so JSON and binary agree
        return _bf16_to_float32(_float32_to_bf16(array.reshape(-1)))
    return np.ascontiguousarray(array.reshape(-1), dtype=datatype.array)


# -- binary ----------------------------------------------------------------------------------------

def from_binary(raw: memoryview, shape: Sequence[int], datatype: Datatype) -> np.ndarray:
    """The array of `shape` in `datatype.array` held by `raw`, a tensor's bytes in the binary tensor
    data extension: row major, little-endian; BOOL one byte 0 or 1; BF16 the top 16 bits of a
    float32; BYTES 4-byte little-endian length-prefixed elements. The array owns its memory."""
    count = math.prod(shape)
    if datatype.name == "BYTES":
        return _object_array(_bytes_elements(raw, count)).reshape(shape)
    needed = count * datatype.wire.itemsize
    if len(raw) != needed:
        raise TensorError(f"binary_data_size is {len(raw)} bytes but shape {list(shape)} of "
                          f"{datatype.name} needs {needed}")
    if datatype.name == "BOOL":
        octets = np.frombuffer(raw, dtype=np.uint8)
        if (octets > 1).any():
            raise TensorError("binary BOOL data must hold bytes 0 (false) or 1 (true)")
        return octets.astype(bool).reshape(shape)
    values = np.frombuffer(raw, dtype=datatype.wire)
    if datatype.name == "BF16":
        return _bf16_to_float32(values).reshape(shape)
    # A copy: the body's bytes are read-only and may be unaligned; a model wants its own array.
    return values.astype(datatype.array).reshape(shape)


def _bytes_elements(raw: memoryview, count: int) -> List[bytes]:
    items, offset, size = [], 0, len(raw)
    for index in range(count):
        if offset + 4 > size:
            raise TensorError(f"binary BYTES data ends before element {index} of {count} (its length prefix)")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > size:
            raise TensorError(f"binary BYTES element {index} claims {length} bytes but only {size - offset} are left")
        items.append(bytes(raw[offset:offset + length]))
        offset += length
    if offset != size:
        raise TensorError(f"binary BYTES data holds {size - offset} bytes after its {count} elements")
    return items


def to_binary(array: np.ndarray, datatype: Datatype) -> bytes:
    """`array` as `datatype` in the binary tensor data extension's layout (see `from_binary`)."""
    if datatype.name == "BYTES":
        elements = [v if isinstance(v, bytes) else str(v).encode("utf-8") for v in array.reshape(-1)]
        return b"".join(_LENGTH.pack(len(v)) + v for v in elements)
    if datatype.name == "BF16":
        return _float32_to_bf16(array.reshape(-1)).tobytes()
    return np.ascontiguousarray(array, dtype=datatype.wire).tobytes()


def _bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _float32_to_bf16(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Round to nearest, ties to even, as torch and ml_dtypes do; NaN kept NaN (rounding could carry
    # its mantissa into the sign bit).
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded).astype("<u2")
