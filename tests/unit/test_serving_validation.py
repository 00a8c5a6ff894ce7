"""Validation of v2 infer requests (serve.protocol.parse_infer_request) for a classifier's
signature, JSON bodies; tests/unit/test_protocol.py covers every datatype and binary data."""

import json

import numpy as np
import pytest

from orchestrator.registry.store import signature_for
from serve.protocol import BadRequest, encode_infer_response, parse_infer_request

INPUT_SHAPE = [1, 2, 2]  # 4 features
SIGNATURE = signature_for(INPUT_SHAPE, num_classes=2)
MAX_ROWS = 3


def body(shape=(2, 4), data=None, datatype="FP32", name="input", **extra) -> bytes:
    data = list(range(int(np.prod(shape)))) if data is None else data
    return json.dumps(
        {"inputs": [{"name": name, "shape": list(shape), "datatype": datatype, "data": data}], **extra}
    ).encode()


def parse(raw: bytes, signature=SIGNATURE, **options):
    return parse_infer_request(raw, signature, header_length=None, max_rows=MAX_ROWS, **options)


@pytest.mark.parametrize(
    "shape, data",
    [
        ([2, 4], [0, 1, 2, 3, 4, 5, 6, 7]),
        ([2, 4], [[0, 1, 2, 3], [4, 5, 6, 7]]),
        ([2, 1, 2, 2], [[[[0, 1], [2, 3]]], [[[4, 5], [6, 7]]]]),
        ([2, 1, 2, 2], [0, 1, 2, 3, 4, 5, 6, 7]),
    ],
)
def test_accepts_flat_or_nested_rows(shape, data):
    parsed = parse(body(shape, data, id="req-1"))
    assert parsed.inputs["input"].dtype == np.float32 and parsed.rows == 2
    np.testing.assert_array_equal(parsed.inputs["input"], np.arange(8, dtype=np.float32).reshape(2, 4))
    assert parsed.request_id == "req-1"


def test_one_row_shape_and_floats():
    parsed = parse(body([4], [0.5, -1.25, 3e5, 7]))
    assert parsed.inputs["input"].shape == (1, 4) and parsed.rows == 1
    assert parsed.inputs["input"][0, 1] == np.float32(-1.25)
    assert parsed.request_id is None


BAD = {
    "invalid json": (b"{not json", 400, "not valid JSON"),
    "empty body": (b"", 400, "not valid JSON"),
    "not utf-8": (b"\xff\xfe{", 400, "not valid JSON"),
    "array body": (b"[1, 2]", 400, "JSON object"),
    "no inputs": (b'{"outputs": []}', 400, "no 'inputs'"),
    "inputs not list": (b'{"inputs": {"name": "input"}}', 400, "non-empty array"),
    "inputs empty": (b'{"inputs": []}', 400, "non-empty array"),
    "input not object": (b'{"inputs": [3]}', 400, "must be an object"),
    "two inputs": (json.dumps({"inputs": [json.loads(body())["inputs"][0]] * 2}).encode(), 400, "more than once"),
    "missing data": (b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32"}]}', 400, "it has neither"),
    "missing all": (b'{"inputs": [{}]}', 400, "'name', 'shape', 'datatype'"),
    "empty name": (body(name=""), 400, "name"),
    "undeclared name": (body(name="pixels"), 400, "'pixels' is not an input of this model, which takes 'input'"),
    "INT64": (body(datatype="INT64"), 400, "datatype 'INT64' but this model takes 'FP32'"),
    "BYTES": (body(datatype="BYTES"), 400, "datatype 'BYTES' but this model takes 'FP32'"),
    "fp99": (body(datatype="fp99"), 400, "'fp99' is not a datatype"),
    "datatype null": (body(datatype=None), 400, "None is not a datatype"),
    "negative dim": (body(shape=[-2, 4], data=[0] * 8), 400, "positive integers"),
    "zero rows": (body(shape=[0, 4], data=[]), 400, "positive integers"),
    "float dim": (body(shape=[2.0, 4], data=[0] * 8), 400, "positive integers"),
    "bool dim": (body(shape=[True, 4], data=[0] * 4), 400, "positive integers"),
    "shape not list": (body(shape="2x4", data=[0] * 8), 400, "positive integers"),
    "count mismatch": (body(shape=[2, 4], data=[0] * 7), 400, "holds 7 values but shape [2, 4] needs 8"),
    "row size": (body(shape=[2, 3], data=[0] * 6), 400, "does not fit this model"),
    "one row too long": (body(shape=[5], data=[0] * 5), 400, "does not fit this model"),
    "ragged nested": (body(shape=[2, 4], data=[[0, 1, 2, 3], [4, 5, 6]]), 400, "must match its shape"),
    "nested wrong depth": (body(shape=[2, 4], data=[[0, 1, 2, 3], 4]), 400, "where an array was expected"),
    "string value": (body(shape=[1, 4], data=[0, 1, "2", 3]), 400, "found a string"),
    "null value": (body(shape=[1, 4], data=[0, 1, None, 3]), 400, "found null"),
    "bool value": (body(shape=[1, 4], data=[0, True, 2, 3]), 400, "found a boolean"),
    "object value": (body(shape=[1, 4], data=[0, {"v": 1}, 2, 3]), 400, "found an object"),
    "data not list": (body(shape=[1, 4], data="0123"), 400, "must be an array"),
    "NaN": (
        b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, NaN, 2, 3]}]}',
        400,
        "NaN",
    ),
    "Infinity": (
        b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, -Infinity, 2, 3]}]}',
        400,
        "Infinity",
    ),
    "beyond float32": (body(shape=[1, 4], data=[0, 1e39, 2, 3]), 400, "finite FP32"),
    "huge int": (body(shape=[1, 4], data=[0, 10**400, 2, 3]), 400, "finite FP32"),
    "1e999": (
        b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, 1e999, 2, 3]}]}',
        400,
        "finite FP32",
    ),
    "deep nesting": (b"[" * 30000 + b"]" * 30000, 400, "not valid JSON"),
    "id not string": (body(id=7), 400, "'id' must be a string"),
    "too many rows": (body(shape=[4, 4]), 413, "at most 3"),
    "huge body": (b" " * (3 * 4 * 64 + 65537), 413, "larger than"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_rejects_bad_request_with_status_and_reason(case):
    raw, status, reason = BAD[case]
    with pytest.raises(BadRequest) as caught:
        parse(raw)
    assert caught.value.status == status
    assert reason in caught.value.message


def test_too_many_rows_is_refused_before_reading_data():
    # The row limit must not depend on the data being valid: a huge request is refused cheaply.
    with pytest.raises(BadRequest) as caught:
        parse(body(shape=[1000, 4], data="not even a list"))
    assert caught.value.status == 413


def test_infer_response_layout():
    probabilities = np.array([[0.25, 0.75], [0.5, 0.5]], dtype=np.float32)
    request = parse(body(id="x"))
    raw, headers = encode_infer_response(
        model="m", version=3, request=request, outputs={"probabilities": probabilities, "label": np.array([1, 0])},
        signature=SIGNATURE,
    )
    assert headers == {"Content-Type": "application/json"}
    response = json.loads(raw)
    assert response["model_name"] == "m" and response["model_version"] == "3" and response["id"] == "x"
    probs, labels = response["outputs"]
    assert probs == {"name": "probabilities", "shape": [2, 2], "datatype": "FP32", "data": [0.25, 0.75, 0.5, 0.5]}
    assert labels == {"name": "label", "shape": [2], "datatype": "INT64", "data": [1, 0]}


def test_serve_app_args_compose_a_pipeline_config():
    from serve.app import config_from_args

    cfg = config_from_args({"storage_root": "/tmp/x", "model": "m", "ref": 3, "min_replicas": 2, "max_replicas": 4})
    assert cfg.storage.root == "file:///tmp/x" and cfg.registry.model_name == "m" and cfg.serve.model_version == "3"
    assert (cfg.serve.min_replicas, cfg.serve.max_replicas) == (2, 4)
    with pytest.raises(ValueError, match=r"missing \['ref'\]"):
        config_from_args({"storage_root": "/tmp/x", "model": "m"})
    with pytest.raises(ValueError, match="unknown serve app args \\['port'\\]"):
        config_from_args({"storage_root": "/tmp/x", "model": "m", "ref": "production", "port": 9000})
    with pytest.raises(ValueError, match="serve.max_replicas"):
        config_from_args(
            {"storage_root": "/tmp/x", "model": "m", "ref": "production", "min_replicas": 3, "max_replicas": 1}
        )


def test_non_finite_values_pass_when_configured():
    raw = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, NaN, -Infinity, 1e39]}]}'
    rows = parse(raw, allow_non_finite=True).inputs["input"]
    assert np.isnan(rows[0, 1]) and rows[0, 2] == -np.inf and rows[0, 3] == np.inf
    huge = parse(body(shape=[1, 4], data=[0, 10**400, -(10**400), 3]), allow_non_finite=True).inputs["input"]
    assert huge[0, 1] == np.inf and huge[0, 2] == -np.inf


def test_datatype_and_byte_limit_come_from_the_signature_and_caller():
    fp64 = {**SIGNATURE, "inputs": [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]}
    parsed = parse(body(datatype="FP64"), fp64)
    assert parsed.inputs["input"].shape == (2, 4) and parsed.inputs["input"].dtype == np.float64
    with pytest.raises(BadRequest, match="this model takes 'FP64'"):
        parse(body(), fp64)
    with pytest.raises(BadRequest) as caught:
        parse(body(), max_body_bytes=20)
    assert caught.value.status == 413 and "20 bytes" in caught.value.message
