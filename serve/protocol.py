"""The Open Inference Protocol v2 (REST) request and response bodies, and the admin rollout body:
parsing and validation.

Pure: no Ray, no HTTP. Every way a client can get a request wrong is a `BadRequest` carrying a 4xx
status and a message that names what is wrong, so the ingress never answers a client error with 5xx.
"""

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

_JSON_TYPES = {str: "a string", type(None): "null", bool: "a boolean", dict: "an object", list: "an array"}


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

    rows: np.ndarray
    """float32 [N, features], finite."""
    request_id: Optional[str]
    """The request's "id", echoed in the response."""


def parse_infer_request(
    body: bytes, input_shape: Sequence[int], max_rows: int, *, datatype: str = "FP32",
    allow_non_finite: bool = False, max_body_bytes: Optional[int] = None,
) -> InferRequest:
    """Parse and validate a v2 infer body for a model taking samples of `input_shape` in `datatype`
    (both from the registry manifest's signature).

    Accepts one input whose shape is [N, F], [N, *input_shape] or [F] (one row), F being the
    feature count, with data flat or nested to match the shape. NaN and Infinity are refused unless
    `allow_non_finite`. Raises BadRequest (400, or 413 for more than `max_rows` rows or a body over
    `max_body_bytes` or over what `max_rows` rows could need) naming what is wrong.
    """
    features = int(np.prod(input_shape))
    limit = min(_max_body_bytes(features, max_rows), max_body_bytes or math.inf)
    if len(body) > limit:
        raise BadRequest(413, f"body of {len(body)} bytes is larger than {limit} bytes, the most this model accepts")
    payload = _load_json(body, allow_non_finite)
    tensor = _single_input(payload)
    shape = _checked_shape(tensor["shape"])
    rows = _row_count(shape, input_shape)
    if rows > max_rows:
        raise BadRequest(413, f"{rows} rows in one request; at most {max_rows} are accepted")
    if tensor["datatype"] != datatype:
        raise BadRequest(400, f"datatype {tensor['datatype']!r} is not supported: this model takes {datatype!r}")
    values = _as_float32(_flat_numbers(tensor["data"], shape), allow_non_finite)
    return InferRequest(rows=values.reshape(rows, features), request_id=_request_id(payload))


def _max_body_bytes(features: int, max_rows: int) -> int:
    # A JSON number rarely needs more than ~25 characters; 64 leaves room for nesting and
    # whitespace while still refusing a body that could never hold a valid request.
    return max_rows * features * 64 + 65536


def _reject_constant(name: str) -> None:
    raise BadRequest(400, f"{name} is not a number this server accepts: send finite numbers")


def _load_json(body: bytes, allow_non_finite: bool) -> Dict[str, Any]:
    try:
        # json.loads accepts NaN and Infinity, which are not JSON: parse_constant rejects them
        # unless the deployment opted in.
        payload = json.loads(body, parse_constant=None if allow_non_finite else _reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(400, f"body is not valid JSON: {err}") from None
    if not isinstance(payload, dict):
        raise BadRequest(400, f"body must be a JSON object with 'inputs', got {_json_type(payload)}")
    return payload


def _json_type(value: Any) -> str:
    return _JSON_TYPES.get(type(value), "a number")


def _single_input(payload: Dict[str, Any]) -> Dict[str, Any]:
    if "inputs" not in payload:
        raise BadRequest(400, "body has no 'inputs'")
    inputs = payload["inputs"]
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(400, f"'inputs' must be a non-empty array, got {_json_type(inputs)}")
    if len(inputs) != 1:
        raise BadRequest(400, f"this model takes exactly one input, got {len(inputs)}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise BadRequest(400, f"inputs[0] must be an object, got {_json_type(tensor)}")
    missing = [key for key in ("name", "shape", "datatype", "data") if key not in tensor]
    if missing:
        raise BadRequest(400, f"inputs[0] is missing {', '.join(repr(k) for k in missing)}")
    if not isinstance(tensor["name"], str) or not tensor["name"]:
        raise BadRequest(400, "inputs[0].name must be a non-empty string")
    return tensor


def _checked_shape(shape: Any) -> List[int]:
    if not isinstance(shape, list) or not shape or not all(type(d) is int and d > 0 for d in shape):
        raise BadRequest(400, f"inputs[0].shape must be a non-empty array of positive integers, got {shape!r:.80}")
    return shape


def _row_count(shape: List[int], input_shape: Sequence[int]) -> int:
    features = int(np.prod(input_shape))
    if shape == [features]:
        return 1
    if len(shape) >= 2 and shape[1:] in ([features], list(input_shape)):
        return shape[0]
    raise BadRequest(
        400,
        f"shape {shape} does not fit this model: "
        f"send [N, {features}], [N, *{list(input_shape)}] or [{features}] for one row",
    )


def _flat_numbers(data: Any, shape: List[int]) -> list:
    if not isinstance(data, list):
        raise BadRequest(400, f"inputs[0].data must be an array of numbers, got {_json_type(data)}")
    if any(isinstance(v, list) for v in data):
        flat: list = []
        _flatten_nested(data, shape, flat)
    else:
        _check_numbers(data)
        flat = data
    needed = math.prod(shape)
    if len(flat) != needed:
        raise BadRequest(400, f"inputs[0].data holds {len(flat)} numbers but shape {shape} needs {needed}")
    return flat


def _flatten_nested(data: list, shape: List[int], out: list) -> None:
    if len(data) != shape[0]:
        raise BadRequest(400, f"nested inputs[0].data must match shape {shape}: "
                              f"found {len(data)} items where {shape[0]} were expected")
    if len(shape) == 1:
        _check_numbers(data)
        out.extend(data)
        return
    for item in data:
        if not isinstance(item, list):
            raise BadRequest(400, "nested inputs[0].data must match its shape: "
                                  f"found {_json_type(item)} where an array was expected")
        _flatten_nested(item, shape[1:], out)


def _check_numbers(values: list) -> None:
    # `type(v) in` rather than isinstance: JSON true/false arrive as bool, a subclass of int.
    for value in values:
        if type(value) not in (int, float):
            found = f"{_json_type(value)} {json.dumps(value):.40}"
            raise BadRequest(400, f"inputs[0].data must hold only numbers, found {found}")


def _as_float32(values: list, allow_non_finite: bool) -> np.ndarray:
    try:
        with np.errstate(over="ignore"):  # overflow becomes inf, rejected below with a clear message
            array = np.asarray(values, dtype=np.float32)
    except OverflowError:  # an integer too large for any float: it is an infinity to FP32
        capped = [(math.inf if v > 0 else -math.inf) if type(v) is int and abs(v) >= 2**128 else v for v in values]
        array = np.asarray(capped, dtype=np.float32)
    if not allow_non_finite and not np.isfinite(array).all():
        raise BadRequest(
            400, "inputs[0].data must hold finite FP32 numbers (no NaN, Infinity or values beyond 3.4e38); "
                 "serve.limits.allow_non_finite=true accepts them",
        )
    return array


def _request_id(payload: Dict[str, Any]) -> Optional[str]:
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(400, f"'id' must be a string, got {_json_type(request_id)}")
    return request_id


def infer_response(
    *, model: str, version: int, request_id: Optional[str], result: Dict[str, np.ndarray],
) -> Dict[str, Any]:
    """The v2 infer response body for `result` = {"probabilities": [N, C], "label": [N]}."""
    probabilities, labels = result["probabilities"], result["label"]
    body: Dict[str, Any] = {"model_name": model, "model_version": str(version)}
    if request_id is not None:
        body["id"] = request_id
    body["outputs"] = [
        {"name": "probabilities", "shape": list(probabilities.shape), "datatype": "FP32",
         "data": probabilities.ravel().tolist()},
        {"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": labels.tolist()},
    ]
    return body


def parse_rollout_body(raw: bytes) -> Tuple[str, float]:
    """(version ref, percent) of a rollout request body {"version": "3" | 3 | "alias", "percent": 10}.

    Raises BadRequest (400) naming what is wrong."""
    try:
        body = json.loads(raw)
    except ValueError as err:
        raise BadRequest(400, f"body is not valid JSON: {err}") from None
    if not isinstance(body, dict) or "version" not in body:
        raise BadRequest(400, 'body must be {"version": <number or alias>, "percent": <0-100>}')
    version, percent = body["version"], body.get("percent", 10)
    if type(version) not in (int, str) or str(version) == "":
        raise BadRequest(400, f"'version' must be a version number or an alias, got {version!r:.40}")
    if type(percent) not in (int, float) or not 0 <= percent <= 100:
        raise BadRequest(400, f"'percent' must be a number in [0, 100], got {percent!r:.40}")
    return str(version), float(percent)
