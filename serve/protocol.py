"""The Open Inference Protocol v2 (REST): infer requests and responses, whole, with the binary tensor
data extension, validated against a model's signature; the metadata bodies; the admin rollout body.

Pure: no Ray, no HTTP. Every way a client can get a request wrong is a `BadRequest` carrying a 4xx
status and a message that names what is wrong, so the ingress never answers a client error with 5xx.
The pydantic models of these bodies, for the OpenAPI document only, are in serve/schemas.py; the
hot path here parses with orjson and checks by hand, which is many times faster.
"""

import importlib.metadata
import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import orjson

from serve.tensors import DATATYPES, Datatype, TensorError, from_binary, from_json, json_type, to_binary, to_json

EXTENSIONS = ("binary_tensor_data",)
"""The protocol extensions this server speaks, as server metadata lists them."""

_FP32_ACCEPTS = frozenset({"FP16", "BF16", "FP64"})
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")
_SCALARS = (str, int, float, bool)


class BadRequest(Exception):
    """An error answered to the client: `status` (4xx, or 5xx for 503/504 limits), `message` says what
    is wrong, `headers` go with the answer (WWW-Authenticate, Retry-After)."""

    def __init__(self, status: int, message: str, *, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass(frozen=True, kw_only=True)
class InferRequest:
    """A validated v2 infer request."""

    inputs: Dict[str, np.ndarray]
    """Every declared input by name, in the signature's order, shaped [rows, ...] in the declared
    datatype's dtype: FP32 float32, INT64 int64, BOOL bool, BF16 float32 (bf16 values), BYTES an
    object array of bytes. Finite unless the caller allowed otherwise."""
    rows: int
    """N, the first dimension, the same for every input."""
    request_id: Optional[str]
    """The request's "id", echoed in the response."""
    outputs: Optional[List[str]]
    """The requested output names in the request's order; None for every declared output."""
    binary_outputs: Dict[str, bool]
    """For each output the response holds: whether it goes as binary data."""
    parameters: Dict[str, Any]
    """The request's own "parameters" (string, number or boolean values)."""


@dataclass(frozen=True)
class _Tensor:
    """A declared input or output of a signature."""

    name: str
    datatype: Datatype
    shape: Tuple[int, ...]
    """Declared dimensions, -1 for any size."""
    sample_shape: Optional[Tuple[int, ...]] = None
    """For an input declared [-1, F]: the signature's input_shape, also accepted for a row."""
    max_row_elements: Optional[int] = None
    """For an input whose row has free dimensions: the most elements a row may hold (from input_shape)."""


@dataclass(frozen=True)
class _Signature:
    inputs: Dict[str, _Tensor]
    outputs: Dict[str, _Tensor]
    max_row_bytes: float
    """The most body bytes one row of every input could need; inf when a row is unbounded."""


@dataclass(frozen=True)
class _Input:
    """One input of a request, its header checked, its data not yet read."""

    declared: _Tensor
    wire: Datatype
    wire_shape: List[int]
    shape: Tuple[int, ...]
    """The shape the model gets."""
    data: Any
    binary_size: Optional[int]


# -- the signature ---------------------------------------------------------------------------------

_COMPILED: Dict[int, Tuple[Dict[str, Any], _Signature]] = {}


def _compiled(signature: Dict[str, Any]) -> _Signature:
    # Keyed by identity, and holding the dict so its id cannot be reused: signatures come from
    # manifests and are never changed in place.
    hit = _COMPILED.get(id(signature))
    if hit is not None and hit[0] is signature:
        return hit[1]
    if len(_COMPILED) >= 256:
        _COMPILED.clear()
    compiled = _compile(signature)
    _COMPILED[id(signature)] = (signature, compiled)
    return compiled


def _compile(signature: Dict[str, Any]) -> _Signature:
    sample = tuple(signature["input_shape"]) if signature.get("input_shape") else None
    single = len(signature["inputs"]) == 1
    inputs = {t["name"]: _declared_input(t, sample, single) for t in signature["inputs"]}
    outputs = {t["name"]: _Tensor(t["name"], DATATYPES[t["datatype"]], tuple(t["shape"])) for t in signature["outputs"]}
    row_bytes = 0.0
    for tensor in inputs.values():
        fixed = math.prod(tensor.shape[1:]) if min(tensor.shape[1:], default=0) >= 0 else tensor.max_row_elements
        # A JSON number rarely needs more than ~25 characters; 64 leaves room for nesting and
        # whitespace while still refusing a body that could never hold a valid request.
        row_bytes += math.inf if fixed is None or tensor.datatype.name == "BYTES" else 64 * fixed
    return _Signature(inputs, outputs, row_bytes)


def _declared_input(tensor: Dict[str, Any], sample: Optional[Tuple[int, ...]], single: bool) -> _Tensor:
    shape = tuple(tensor["shape"])
    datatype = DATATYPES[tensor["datatype"]]
    if min(shape[1:], default=0) < 0:  # a free row dimension: a lone input's input_shape bounds it
        limit = math.prod(sample) if single and sample else None
        return _Tensor(tensor["name"], datatype, shape, max_row_elements=limit)
    fits = sample is not None and len(shape) == 2 and math.prod(sample) == shape[1]
    return _Tensor(tensor["name"], datatype, shape, sample_shape=sample if fits else None)


# -- infer requests --------------------------------------------------------------------------------

def parse_infer_request(
    body: bytes, signature: Dict[str, Any], *, header_length: Optional[str], max_rows: int,
    allow_non_finite: bool = False, max_body_bytes: Optional[int] = None,
) -> InferRequest:
    """Parse and validate a v2 infer body against `signature` (the registry manifest's: "inputs" and
    "outputs" as [{"name", "datatype", "shape"}], shape -1 for any size, and "input_shape").

    `header_length` is the Inference-Header-Content-Length header (None when absent): the body is
    then that many bytes of JSON followed by the binary data of each input with a binary_data_size
    parameter, in the inputs' order. Every declared input must come, no other; its datatype must
    be the declared one, except that an FP32 input also accepts FP16, BF16 and FP64 data, cast to
    float32. An input declared [-1, F] may also come as [F] (one row) or [N, *input_shape]; a lone
    input with free row dimensions holds at most prod(input_shape) elements a row. JSON data is
    flat or nested to match the shape. NaN and Infinity are refused unless `allow_non_finite`.

    Raises BadRequest: 400 naming what is wrong, 413 for more than `max_rows` rows or a body over
    `max_body_bytes` or over what `max_rows` rows could need.
    """
    sig = _compiled(signature)
    _check_body_size(len(body), sig, max_rows, max_body_bytes)
    header, binary = _split_body(body, header_length)
    payload = _load_json(header, allow_non_finite)
    inputs = _read_inputs(payload, sig)
    rows = _row_count(inputs, max_rows)
    parameters = _request_parameters(payload)
    outputs, binary_outputs = _requested_outputs(payload, sig, parameters.get("binary_data_output", False))
    return InferRequest(
        inputs=_input_arrays(inputs, binary, sig.inputs, allow_non_finite), rows=rows, request_id=_request_id(payload),
        outputs=outputs, binary_outputs=binary_outputs, parameters=parameters,
    )


def _check_body_size(size: int, sig: _Signature, max_rows: int, max_body_bytes: Optional[int]) -> None:
    limit = min(max_rows * sig.max_row_bytes + 65536, max_body_bytes or math.inf)
    if size > limit:
        raise BadRequest(413, f"body of {size} bytes is larger than {limit:.0f} bytes, the most this model accepts")


def _split_body(body: bytes, header_length: Optional[str]) -> Tuple[bytes, memoryview]:
    if header_length is None:
        return body, memoryview(b"")
    text = header_length.strip()
    # Digits only (int() also takes "+1", "1_0" and other scripts' digits), and few of them.
    if not (text.isascii() and text.isdigit() and len(text) < 20 and 0 < int(text) <= len(body)):
        raise BadRequest(400, f"Inference-Header-Content-Length must be a byte count from 1 to the body's "
                              f"{len(body)} bytes, got {header_length!r:.40}")
    return body[:int(text)], memoryview(body)[int(text):]


def _load_json(raw: bytes, allow_non_finite: bool) -> Dict[str, Any]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        payload = _load_json_slowly(raw, allow_non_finite)
    if not isinstance(payload, dict):
        raise BadRequest(400, f"body must be a JSON object with 'inputs', got {json_type(payload)}")
    return payload


def _load_json_slowly(raw: bytes, allow_non_finite: bool) -> Any:
    # orjson refuses some valid JSON (numbers beyond float64, lone surrogate escapes) and the NaN and
    # Infinity literals some clients send; the standard library parses those, and names what is
    # wrong with the rest. parse_constant refuses NaN and Infinity unless the deployment opted in.
    try:
        return json.loads(raw, parse_constant=None if allow_non_finite else _reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(400, f"body is not valid JSON: {err}") from None


def _reject_constant(name: str) -> None:
    raise BadRequest(400, f"{name} is not a number this server accepts: send finite numbers")


def _read_inputs(payload: Dict[str, Any], sig: _Signature) -> List[_Input]:
    if "inputs" not in payload:
        raise BadRequest(400, "body has no 'inputs'")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(400, f"'inputs' must be a non-empty array, got {json_type(inputs)}")
    read = [_read_input(index, tensor, sig) for index, tensor in enumerate(inputs)]
    names = [item.declared.name for item in read]
    if len(set(names)) < len(names):
        twice = next(name for name in names if names.count(name) > 1)
        raise BadRequest(400, f"input {twice!r} is given more than once")
    missing = [name for name in sig.inputs if name not in names]
    if missing:
        raise BadRequest(400, f"missing input {_listed(missing)}: this model takes {_listed(sig.inputs)}")
    return read


def _read_input(index: int, tensor: Any, sig: _Signature) -> _Input:
    if not isinstance(tensor, dict):
        raise BadRequest(400, f"inputs[{index}] must be an object, got {json_type(tensor)}")
    missing = [key for key in ("name", "shape", "datatype") if key not in tensor]
    if missing:
        raise BadRequest(400, f"inputs[{index}] is missing {_listed(missing)}")
    name = tensor["name"]
    if not isinstance(name, str) or not name:
        raise BadRequest(400, f"inputs[{index}].name must be a non-empty string")
    declared = sig.inputs.get(name)
    if declared is None:
        raise BadRequest(400, f"input {name!r:.60} is not an input of this model, which takes {_listed(sig.inputs)}")
    where = f"input {name!r}"
    binary_size = _binary_size(_parameters(tensor.get("parameters"), f"{where} parameters"), where)
    if (binary_size is None) != (tensor.get("data") is not None):
        raise BadRequest(400, f"{where} needs either 'data' or parameters.binary_data_size (with binary data "
                              "after the JSON), " + ("not both" if binary_size is not None else "it has neither"))
    wire = _wire_datatype(tensor["datatype"], declared, where)
    wire_shape = _checked_shape(tensor["shape"], where)
    return _Input(declared, wire, wire_shape, _fit_shape(wire_shape, declared, where), tensor.get("data"), binary_size)


def _binary_size(parameters: Dict[str, Any], where: str) -> Optional[int]:
    _refuse(parameters, _SHARED_MEMORY, where)
    size = parameters.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise BadRequest(400, f"{where} parameters.binary_data_size must be a byte count (an integer >= 0), "
                              f"got {size!r:.40}")
    return size


def _wire_datatype(value: Any, declared: _Tensor, where: str) -> Datatype:
    expected = declared.datatype
    if value == expected.name:
        return expected
    wire = DATATYPES.get(value) if isinstance(value, str) else None
    if wire is None:
        raise BadRequest(400, f"{where} datatype {value!r:.40} is not a datatype of the Open Inference Protocol "
                              f"({', '.join(DATATYPES)})")
    if expected.name == "FP32" and wire.name in _FP32_ACCEPTS:
        return wire
    also = " (or FP16, BF16, FP64, cast to FP32)" if expected.name == "FP32" else ""
    raise BadRequest(400, f"{where} has datatype {value!r} but this model takes {expected.name!r}{also}")


def _checked_shape(shape: Any, where: str) -> List[int]:
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise BadRequest(400, f"{where} shape must be a non-empty array of positive integers, got {shape!r:.80}")
    return shape


def _fit_shape(wire: List[int], declared: _Tensor, where: str) -> Tuple[int, ...]:
    dims = declared.shape
    if len(wire) == len(dims) and all(d < 0 or d == w for w, d in zip(wire, dims)):
        shape = tuple(wire)
    elif declared.sample_shape is not None and wire[1:] == list(declared.sample_shape):
        shape = (wire[0], dims[1])
    elif len(dims) == 2 and dims[1] >= 0 and wire == [dims[1]]:
        shape = (1, dims[1])
    else:
        raise BadRequest(400, f"{where} shape {wire} does not fit this model: {_shape_hint(declared)}")
    row = math.prod(shape[1:])
    if declared.max_row_elements is not None and row > declared.max_row_elements:
        raise BadRequest(400, f"{where} has {row} elements a row; this model takes at most {declared.max_row_elements}")
    return shape


def _shape_hint(declared: _Tensor) -> str:
    dims = list(declared.shape)
    if len(dims) == 2 and dims[1] >= 0:
        sample = f", [N, *{list(declared.sample_shape)}]" if declared.sample_shape else ""
        return f"send [N, {dims[1]}]{sample} or [{dims[1]}] for one row"
    return f"send a shape that matches {dims} (-1: any size)"


def _row_count(inputs: List[_Input], max_rows: int) -> int:
    counts = {item.declared.name: item.shape[0] for item in inputs}
    rows = max(counts.values())
    if rows > max_rows:
        raise BadRequest(413, f"{rows} rows in one request; at most {max_rows} are accepted")
    if min(counts.values()) != rows:
        raise BadRequest(400, f"every input must have the same number of rows (first dimension), got {counts}")
    return rows


def _input_arrays(
    inputs: List[_Input], binary: memoryview, order: Iterable[str], allow_non_finite: bool,
) -> Dict[str, np.ndarray]:
    total = sum(item.binary_size or 0 for item in inputs)
    if total != len(binary):
        raise BadRequest(400, f"the inputs' binary_data_size add up to {total} bytes but the body holds {len(binary)} "
                              "bytes after its JSON header (whose length is Inference-Header-Content-Length)")
    arrays, offset = {}, 0
    for item in inputs:
        name = item.declared.name
        try:
            if item.binary_size is None:
                array = from_json(item.data, item.wire_shape, item.wire)
            else:
                array = from_binary(binary[offset:offset + item.binary_size], item.wire_shape, item.wire)
                offset += item.binary_size
        except TensorError as err:
            raise BadRequest(400, f"input {name!r}: {err}") from None
        arrays[name] = _as_declared(array, item, allow_non_finite)
    return {name: arrays[name] for name in order}


def _as_declared(array: np.ndarray, item: _Input, allow_non_finite: bool) -> np.ndarray:
    datatype = item.declared.datatype
    if array.dtype != datatype.array:  # FP16 or FP64 into an FP32 input (BF16 arrives as float32)
        with np.errstate(over="ignore"):  # beyond float32 becomes inf, refused below
            array = array.astype(datatype.array)
    array = array.reshape(item.shape)
    if datatype.is_float and not allow_non_finite and not np.isfinite(array).all():
        largest = float(np.finfo(datatype.array).max)
        raise BadRequest(400, f"input {item.declared.name!r}: data must hold finite {datatype.name} numbers "
                              f"(no NaN, Infinity or values beyond {largest:.2g}); "
                              "serve.limits.allow_non_finite=true accepts them")
    return array


def _request_parameters(payload: Dict[str, Any]) -> Dict[str, Any]:
    parameters = _parameters(payload.get("parameters"), "parameters")
    if type(parameters.get("binary_data_output", False)) is not bool:
        raise BadRequest(400, "parameters.binary_data_output must be a boolean")
    return parameters


def _requested_outputs(
    payload: Dict[str, Any], sig: _Signature, binary_default: bool,
) -> Tuple[Optional[List[str]], Dict[str, bool]]:
    requested = payload.get("outputs")
    if not requested:  # absent, null or []: every output
        return None, {name: binary_default for name in sig.outputs}
    if not isinstance(requested, list):
        raise BadRequest(400, f"'outputs' must be an array, got {json_type(requested)}")
    binary: Dict[str, bool] = {}
    for index, output in enumerate(requested):
        name, wants_binary = _requested_output(index, output, sig, binary_default)
        if name in binary:
            raise BadRequest(400, f"output {name!r} is requested more than once")
        binary[name] = wants_binary
    return list(binary), binary


def _requested_output(index: int, output: Any, sig: _Signature, binary_default: bool) -> Tuple[str, bool]:
    if not isinstance(output, dict) or not isinstance(output.get("name"), str):
        raise BadRequest(400, f"outputs[{index}] must be an object with a string 'name'")
    name = output["name"]
    if name not in sig.outputs:
        raise BadRequest(400, f"output {name!r:.60} is not an output of this model, which has {_listed(sig.outputs)}")
    where = f"output {name!r}"
    parameters = _parameters(output.get("parameters"), f"{where} parameters")
    _refuse(parameters, ("classification", *_SHARED_MEMORY), where)
    wants_binary = parameters.get("binary_data", binary_default)
    if type(wants_binary) is not bool:
        raise BadRequest(400, f"{where} parameters.binary_data must be a boolean")
    return name, wants_binary


def _parameters(value: Any, where: str) -> Dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(400, f"{where} must be an object, got {json_type(value)}")
    for key, item in value.items():
        if type(item) not in _SCALARS:
            raise BadRequest(400, f"{where}[{key!r:.40}] must be a string, number or boolean, got {json_type(item)}")
    return value


def _refuse(parameters: Dict[str, Any], unsupported: Sequence[str], where: str) -> None:
    found = [key for key in unsupported if key in parameters]
    if found:
        raise BadRequest(400, f"{where} parameters {_listed(found)} belong to a protocol extension this server "
                              f"does not implement (it implements {', '.join(EXTENSIONS)})")


def _request_id(payload: Dict[str, Any]) -> Optional[str]:
    request_id = payload.get("id")
    if request_id is None:
        return None
    if not isinstance(request_id, str):
        raise BadRequest(400, f"'id' must be a string, got {json_type(request_id)}")
    try:
        request_id.encode("utf-8")  # a lone surrogate (a JSON escape can spell one) cannot be echoed
    except UnicodeEncodeError:
        raise BadRequest(400, "'id' is not valid Unicode") from None
    return request_id


def _listed(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


# -- infer responses -------------------------------------------------------------------------------

def encode_infer_response(
    *, model: str, version: int, request: InferRequest, outputs: Dict[str, np.ndarray], signature: Dict[str, Any],
) -> Tuple[bytes, Dict[str, str]]:
    """The v2 infer response to `request`: its body and the headers that go with it.

    `outputs` holds the model's output arrays by name (at least those requested); each is sent in
    the signature's datatype, as binary data where `request.binary_outputs` says so, else as JSON.
    With any binary output the body is the JSON header then each binary output's bytes in order,
    Content-Type application/octet-stream, and Inference-Header-Content-Length the header's length;
    otherwise the body is JSON. Raises BadRequest (400) for BYTES outputs that cannot go as JSON.
    """
    sig = _compiled(signature)
    header: Dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request.request_id is not None:
        header["id"] = request.request_id
    entries, chunks, finite = [], [], True
    for name in request.outputs or sig.outputs:
        datatype, array = sig.outputs[name].datatype, outputs[name]
        entry: Dict[str, Any] = {"name": name, "datatype": datatype.name, "shape": list(array.shape)}
        if request.binary_outputs.get(name, False):
            chunks.append(to_binary(array, datatype))
            entry["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            entry["data"] = _json_data(name, array, datatype)
            finite = finite and not (datatype.is_float and not np.isfinite(entry["data"]).all())
        entries.append(entry)
    header["outputs"] = entries
    head = _dumps(header, finite)
    if not chunks:
        return head, {"Content-Type": "application/json"}
    return b"".join([head, *chunks]), {"Content-Type": "application/octet-stream",
                                       "Inference-Header-Content-Length": str(len(head))}


def _json_data(name: str, array: np.ndarray, datatype: Datatype) -> Any:
    try:
        return to_json(array, datatype)
    except TensorError as err:
        raise BadRequest(400, f"output {name!r} {err}: request it with parameters.binary_data=true") from None


def _dumps(header: Dict[str, Any], finite: bool) -> bytes:
    if finite:
        return orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    # orjson writes NaN and Infinity as null; the standard library writes the NaN and Infinity
    # literals, as Triton does and tritonclient reads (only a model let past finite checks gets here).
    return json.dumps(header, default=lambda array: array.tolist(), separators=(",", ":")).encode()


# -- metadata --------------------------------------------------------------------------------------

def project_version() -> str:
    """This project's version, as its installed distribution says ("unknown" when run uninstalled)."""
    try:
        return importlib.metadata.version("orchestrator")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def server_metadata(version: str, extensions: Sequence[str] = EXTENSIONS) -> Dict[str, Any]:
    """The v2 server metadata body: this project's name, `version` and the protocol `extensions` served."""
    return {"name": "orchestrator", "version": version, "extensions": list(extensions)}


def model_metadata(name: str, versions: Sequence[int], signature: Dict[str, Any]) -> Dict[str, Any]:
    """The v2 model metadata body of `name` serving `versions`, its tensors from `signature`."""
    def tensors(kind: str) -> List[Dict[str, Any]]:
        return [{"name": t["name"], "datatype": t["datatype"], "shape": list(t["shape"])} for t in signature[kind]]

    return {"name": name, "versions": [str(v) for v in versions], "platform": "pytorch",
            "inputs": tensors("inputs"), "outputs": tensors("outputs")}


# -- admin -----------------------------------------------------------------------------------------

def parse_rollout_body(raw: bytes) -> Tuple[str, float]:
    """(version ref, percent) of a rollout request body {"version": "3" | 3 | "alias", "percent": 10}.

    Raises BadRequest (400) naming what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise BadRequest(400, f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict) or "version" not in body:
        raise BadRequest(400, 'body must be {"version": <number or alias>, "percent": <0-100>}')
    version, percent = body["version"], body.get("percent", 10)
    if type(version) not in (int, str) or str(version) == "":
        raise BadRequest(400, f"'version' must be a version number or an alias, got {version!r:.40}")
    if type(percent) not in (int, float) or not 0 <= percent <= 100:
        raise BadRequest(400, f"'percent' must be a number in [0, 100], got {percent!r:.40}")
    return str(version), float(percent)
