"""The Open Inference Protocol v2 layer (serve.protocol, serve.tensors, serve.schemas), without Ray or
HTTP: every datatype in JSON and binary form, several inputs, output selection, parameters, limits,
the binary response layout, fuzzing, and tritonclient's own request and response codecs."""

import json
from importlib.metadata import version as installed_version
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.registry.store import signature_for
from serve.protocol import (
    BadRequest,
    InferRequest,
    encode_infer_response,
    model_metadata,
    parse_infer_request,
    project_version,
    server_metadata,
)
from serve.schemas import InferenceRequest, InferenceResponse, infer_openapi_extra
from serve.tensors import DATATYPES

MAX_ROWS = 8
CLASSIFIER = signature_for([1, 2, 2], num_classes=3)  # input FP32 [-1, 4]; probabilities FP32 [-1, 3], label INT64
LANGUAGE_MODEL = {  # as CausalLM.signature writes it, context 6
    "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}],
    "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, 5]}],
    "input_shape": [6],
}
MULTI = {
    "inputs": [
        {"name": "tokens", "datatype": "INT32", "shape": [-1, 3]},
        {"name": "mask", "datatype": "BOOL", "shape": [-1, 3]},
        {"name": "text", "datatype": "BYTES", "shape": [-1]},
        {"name": "scale", "datatype": "FP32", "shape": [-1, 1]},
    ],
    "outputs": [{"name": "score", "datatype": "FP32", "shape": [-1]},
                {"name": "tag", "datatype": "BYTES", "shape": [-1]}],
}
NUMPY = {name: datatype.array for name, datatype in DATATYPES.items()}


def echo_signature(datatype: str) -> Dict[str, Any]:
    return {"inputs": [{"name": "x", "datatype": datatype, "shape": [-1, 3]}],
            "outputs": [{"name": "y", "datatype": datatype, "shape": [-1, 3]}]}


# -- an independent encoder and decoder of the wire forms, written from the spec ---------------------

def bf16_exact(bits: List[int]) -> np.ndarray:
    return (np.array(bits, dtype=np.uint32) << 16).view(np.float32)


def to_wire(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        return b"".join(len(v).to_bytes(4, "little") + v for v in array.reshape(-1))
    if datatype == "BF16":
        return (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=DATATYPES[datatype].wire).tobytes()


def from_wire(raw: bytes, datatype: str, shape: List[int]) -> np.ndarray:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            length = int.from_bytes(raw[offset:offset + 4], "little")
            items.append(raw[offset + 4:offset + 4 + length])
            offset += 4 + length
        array = np.empty(len(items), dtype=object)
        array[:] = items
        return array.reshape(shape)
    if datatype == "BF16":
        return bf16_exact(np.frombuffer(raw, dtype="<u2").tolist()).reshape(shape)
    return np.frombuffer(raw, dtype=DATATYPES[datatype].wire).reshape(shape)


def json_values(array: np.ndarray, datatype: str) -> list:
    if datatype == "BYTES":
        return [v.decode() for v in array.reshape(-1)]
    return array.reshape(-1).tolist()


def request(inputs: List[Tuple[str, str, np.ndarray, bool]], **fields: Any) -> Tuple[bytes, Optional[str]]:
    """A request body and its Inference-Header-Content-Length for (name, datatype, array, binary) inputs."""
    tensors, chunks = [], []
    for name, datatype, array, binary in inputs:
        tensor: Dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(array.shape)}
        if binary:
            chunks.append(to_wire(array, datatype))
            tensor["parameters"] = {"binary_data_size": len(chunks[-1])}
        else:
            tensor["data"] = json_values(array, datatype)
        tensors.append(tensor)
    header = json.dumps({**fields, "inputs": tensors}).encode()
    return header + b"".join(chunks), (str(len(header)) if chunks else None)


def read_response(raw: bytes, headers: Dict[str, str]) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    binary = "Inference-Header-Content-Length" in headers
    assert headers["Content-Type"] == ("application/octet-stream" if binary else "application/json")
    length = int(headers["Inference-Header-Content-Length"]) if binary else len(raw)
    header = json.loads(raw[:length])
    arrays, offset = {}, length
    for output in header["outputs"]:
        name, datatype, shape = output["name"], output["datatype"], output["shape"]
        if "data" in output:
            data = [v.encode() for v in output["data"]] if datatype == "BYTES" else output["data"]
            arrays[name] = np.array(data, dtype=NUMPY[datatype]).reshape(shape)
        else:
            size = output["parameters"]["binary_data_size"]
            arrays[name] = from_wire(raw[offset:offset + size], datatype, shape)
            offset += size
    assert offset == len(raw), "bytes left after the last binary output"
    return header, arrays


def parse(body: bytes, header_length: Optional[str], signature: Dict[str, Any] = CLASSIFIER,
          **options: Any) -> InferRequest:
    return parse_infer_request(body, signature, header_length=header_length, max_rows=MAX_ROWS, **options)


def refused(body: bytes, header_length: Optional[str], signature: Dict[str, Any] = CLASSIFIER,
            **options: Any) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        parse(body, header_length, signature, **options)
    return caught.value


def classify(parsed: InferRequest) -> Dict[str, np.ndarray]:
    rows = parsed.inputs["input"]
    probabilities = np.abs(rows[:, :3]) / (np.abs(rows[:, :3]).sum(axis=1, keepdims=True) + 1)
    return {"probabilities": probabilities.astype(np.float32), "label": probabilities.argmax(axis=1)}


# -- every datatype ----------------------------------------------------------------------------------

def sample(datatype: str, binary: bool) -> np.ndarray:
    """Two rows of three values of `datatype`, its extremes included."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype.startswith(("UINT", "INT")):
        info = np.iinfo(NUMPY[datatype])
        return np.array([[info.min, info.max, 0], [1, info.max - 1, info.min + 1]], dtype=NUMPY[datatype])
    if datatype == "BF16":
        return bf16_exact([0x3F80, 0xC020, 0x7F7F, 0x0001, 0x8000, 0x4049]).reshape(2, 3)
    if datatype == "BYTES":
        raw = b"\x00\xff binary" if binary else "ünïcode".encode()
        items = [b"", b"hello", raw, "é".encode(), b"x" * 300, b"last"]
        array = np.empty(6, dtype=object)
        array[:] = items
        return array.reshape(2, 3)
    info = np.finfo(NUMPY[datatype])
    return np.array([[info.max, -info.max, info.tiny], [info.smallest_subnormal, 0.1, -0.0]], dtype=NUMPY[datatype])


@pytest.mark.parametrize("output_binary", [False, True], ids=["json-out", "binary-out"])
@pytest.mark.parametrize("input_binary", [False, True], ids=["json-in", "binary-in"])
@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_every_datatype_round_trips(datatype, input_binary, output_binary):
    values = sample(datatype, binary=input_binary and output_binary)
    signature = echo_signature(datatype)
    body, length = request([("x", datatype, values, input_binary)], parameters={"binary_data_output": output_binary})
    parsed = parse(body, length, signature)
    got = parsed.inputs["x"]
    assert got.dtype == NUMPY[datatype] and got.shape == (2, 3) and parsed.rows == 2
    np.testing.assert_array_equal(got, values)
    assert parsed.binary_outputs == {"y": output_binary} and parsed.outputs is None

    raw, headers = encode_infer_response(model="echo", version=2, request=parsed, outputs={"y": got},
                                         signature=signature)
    header, arrays = read_response(raw, headers)
    assert ("data" not in header["outputs"][0]) is output_binary
    assert arrays["y"].dtype == NUMPY[datatype]
    np.testing.assert_array_equal(arrays["y"], values)


@pytest.mark.parametrize("datatype", ["FP16", "BF16", "FP64"])
@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_an_fp32_model_takes_fp16_bf16_and_fp64_as_float32(datatype, binary):
    values = (bf16_exact([0x3F80, 0xC020, 0x4049, 0x3E80]) if datatype == "BF16"
              else np.array([1.0, -2.5, 3.140625, 0.25], dtype=NUMPY[datatype])).reshape(1, 4)
    body, length = request([("input", datatype, values, binary)])
    rows = parse(body, length).inputs["input"]
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, values.astype(np.float32))


def test_fp64_beyond_float32_is_refused_for_an_fp32_model():
    body, length = request([("input", "FP64", np.array([[0, 1e300, 2, 3]]), True)])
    assert "finite FP32" in refused(body, length).message


def test_other_datatypes_are_refused_by_an_fp32_model():
    body, length = request([("input", "INT64", np.arange(4).reshape(1, 4), True)])
    err = refused(body, length)
    assert err.status == 400 and "datatype 'INT64' but this model takes 'FP32'" in err.message


def test_bf16_outputs_round_to_nearest_even_like_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    values = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32) * 1e3
    values[0] = [np.nan, np.inf, -np.inf]
    signature = echo_signature("BF16")
    body, length = request([("x", "BF16", bf16_exact([0] * 12).reshape(4, 3), True)],
                           parameters={"binary_data_output": True})
    raw, headers = encode_infer_response(model="m", version=1, request=parse(body, length, signature),
                                         outputs={"y": values}, signature=signature)
    data = raw[int(headers["Inference-Header-Content-Length"]):]
    expected = values.astype(ml_dtypes.bfloat16)
    assert data[2:] == expected.tobytes()[2:]  # every value but NaN, whose payload bits may differ
    assert np.isnan(np.frombuffer(data, dtype=ml_dtypes.bfloat16)[0])


# -- several inputs, mixed forms -----------------------------------------------------------------------

def multi_inputs(rows: int = 2) -> List[Tuple[str, str, np.ndarray, bool]]:
    text = np.empty(rows, dtype=object)
    text[:] = [f"row {i}".encode() for i in range(rows)]
    return [
        ("scale", "FP32", np.full((rows, 1), 0.5, dtype=np.float32), False),  # not in declared order
        ("tokens", "INT32", np.arange(3 * rows, dtype=np.int32).reshape(rows, 3), True),
        ("text", "BYTES", text, True),
        ("mask", "BOOL", np.ones((rows, 3), dtype=bool), False),
    ]


def test_several_inputs_mixing_binary_and_json():
    body, length = request(multi_inputs())
    parsed = parse(body, length, MULTI)
    assert list(parsed.inputs) == ["tokens", "mask", "text", "scale"]  # the signature's order
    np.testing.assert_array_equal(parsed.inputs["tokens"], np.arange(6, dtype=np.int32).reshape(2, 3))
    assert parsed.inputs["mask"].dtype == bool and parsed.inputs["mask"].all()
    assert parsed.inputs["text"].tolist() == [b"row 0", b"row 1"]
    assert parsed.inputs["scale"].tolist() == [[0.5], [0.5]] and parsed.rows == 2


@pytest.mark.parametrize(
    "change, reason",
    [
        (lambda inputs: inputs[:3], "missing input 'mask'"),
        (lambda inputs: inputs + [inputs[0]], "'scale' is given more than once"),
        (lambda inputs: inputs + [("extra", "FP32", np.zeros((2, 1), np.float32), False)],
         "'extra' is not an input of this model, which takes 'tokens', 'mask', 'text', 'scale'"),
        (lambda inputs: [inputs[0], *multi_inputs(3)[1:2], *inputs[2:]], "same number of rows"),
    ],
    ids=["missing", "twice", "undeclared", "rows differ"],
)
def test_several_inputs_must_match_the_signature(change, reason):
    body, length = request(change(multi_inputs()))
    err = refused(body, length, MULTI)
    assert err.status == 400 and reason in err.message


# -- outputs and parameters ----------------------------------------------------------------------------

def test_outputs_select_and_order_the_response():
    x = np.ones((2, 4), dtype=np.float32)
    body, length = request([("input", "FP32", x, False)], id="abc", outputs=[
        {"name": "label"}, {"name": "probabilities", "parameters": {"binary_data": True}}])
    parsed = parse(body, length)
    assert parsed.outputs == ["label", "probabilities"]
    assert parsed.binary_outputs == {"label": False, "probabilities": True}
    raw, headers = encode_infer_response(model="m", version=1, request=parsed, outputs=classify(parsed),
                                         signature=CLASSIFIER)
    header, arrays = read_response(raw, headers)
    assert [o["name"] for o in header["outputs"]] == ["label", "probabilities"] and header["id"] == "abc"
    np.testing.assert_array_equal(arrays["probabilities"], classify(parsed)["probabilities"])

    body, length = request([("input", "FP32", x, False)], outputs=[{"name": "label"}])
    raw, headers = encode_infer_response(model="m", version=1, request=parse(body, length),
                                         outputs=classify(parsed), signature=CLASSIFIER)
    assert [o["name"] for o in read_response(raw, headers)[0]["outputs"]] == ["label"]


def test_binary_data_output_is_the_default_an_output_overrides():
    body, length = request([("input", "FP32", np.ones((1, 4), np.float32), False)],
                           parameters={"binary_data_output": True, "priority": 1},
                           outputs=[{"name": "label", "parameters": {"binary_data": False}}, {"name": "probabilities"}])
    parsed = parse(body, length)
    assert parsed.binary_outputs == {"label": False, "probabilities": True}
    assert parsed.parameters == {"binary_data_output": True, "priority": 1}


BAD_FIELDS: Dict[str, Tuple[Dict[str, Any], str]] = {
    "unknown output": ({"outputs": [{"name": "logits"}]}, "'logits' is not an output of this model"),
    "output twice": ({"outputs": [{"name": "label"}, {"name": "label"}]}, "'label' is requested more than once"),
    "output not object": ({"outputs": ["label"]}, "outputs[0] must be an object"),
    "outputs not array": ({"outputs": {"name": "label"}}, "'outputs' must be an array"),
    "parameters not object": ({"parameters": [1]}, "parameters must be an object, got an array"),
    "parameter nested": ({"parameters": {"a": {"b": 1}}}, "parameters['a'] must be a string, number or boolean"),
    "parameter null": ({"parameters": {"a": None}}, "got null"),
    "binary_data_output not bool": ({"parameters": {"binary_data_output": 1}}, "binary_data_output must be a boolean"),
    "binary_data not bool": ({"outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]},
                             "binary_data must be a boolean"),
    "output parameters list": ({"outputs": [{"name": "label", "parameters": []}]},
                               "output 'label' parameters must be an object"),
    "classification": ({"outputs": [{"name": "label", "parameters": {"classification": 2}}]},
                       "'classification' belong to a protocol extension this server does not implement"),
    "id not string": ({"id": 7}, "'id' must be a string"),
}


@pytest.mark.parametrize("case", sorted(BAD_FIELDS))
def test_malformed_outputs_parameters_and_id_are_400(case):
    fields, reason = BAD_FIELDS[case]
    body, length = request([("input", "FP32", np.ones((1, 4), np.float32), False)], **fields)
    err = refused(body, length)
    assert err.status == 400 and reason in err.message


def tensor_with(**changes: Any) -> bytes:
    tensor = {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [0, 1, 2, 3], **changes}
    return json.dumps({"inputs": [{k: v for k, v in tensor.items() if v is not None}]}).encode()


@pytest.mark.parametrize(
    "body, reason",
    [
        (tensor_with(parameters="binary"), "input 'input' parameters must be an object"),
        (tensor_with(parameters={"x": [1]}), "must be a string, number or boolean"),
        (tensor_with(parameters={"binary_data_size": -1}), "binary_data_size must be a byte count"),
        (tensor_with(parameters={"binary_data_size": True}), "binary_data_size must be a byte count"),
        (tensor_with(parameters={"binary_data_size": "16"}), "binary_data_size must be a byte count"),
        (tensor_with(parameters={"binary_data_size": 16}), "not both"),
        (tensor_with(data=None, parameters={"shared_memory_region": "r"}), "does not implement"),
        (tensor_with(data=None), "it has neither"),
    ],
)
def test_malformed_input_parameters_are_400(body, reason):
    err = refused(body, None)
    assert err.status == 400 and reason in err.message


def test_unknown_fields_and_parameters_are_accepted():
    # Clients send "model_name" in requests (the binary extension's own example does) and
    # extension parameters this server has no use for.
    body = json.dumps({"model_name": "m", "parameters": {"sequence_id": 3, "note": "x", "ratio": 0.5}, "inputs": [
        {"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4], "parameters": {"tag": True}}]})
    assert parse(body.encode(), None).parameters == {"sequence_id": 3, "note": "x", "ratio": 0.5}


# -- the binary layout ------------------------------------------------------------------------------

def test_binary_response_layout_byte_exact():
    body, length = request([("input", "FP32", np.ones((2, 4), np.float32), True)], id="r-7",
                           parameters={"binary_data_output": True})
    parsed = parse(body, length)
    probabilities = np.array([[0.5, 0.25, 0.25], [0.0, 1.0, 0.0]], dtype=np.float32)
    label = np.array([0, 1])
    raw, headers = encode_infer_response(model="digits", version=4, request=parsed,
                                         outputs={"probabilities": probabilities, "label": label},
                                         signature=CLASSIFIER)
    header = {"model_name": "digits", "model_version": "4", "id": "r-7", "outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "parameters": {"binary_data_size": 24}},
        {"name": "label", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}}]}
    head = raw[:int(headers["Inference-Header-Content-Length"])]
    assert json.loads(head) == header
    assert raw[len(head):] == probabilities.astype("<f4").tobytes() + label.astype("<i8").tobytes()
    assert headers == {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}


def binary_classifier_body() -> Tuple[bytes, str]:
    body, length = request([("input", "FP32", np.arange(8, dtype=np.float32).reshape(2, 4), True)])
    assert length is not None
    return body, length


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b, n: (b[:-1], n), "add up to 32 bytes but the body holds 31"),
        (lambda b, n: (b + b"\x00", n), "add up to 32 bytes but the body holds 33"),
        (lambda b, n: (b[:int(n)], n), "holds 0 bytes"),
        (lambda b, n: (b, None), "not valid JSON"),
        (lambda b, n: (b, str(len(b) + 1)), "Inference-Header-Content-Length must be a byte count"),
        (lambda b, n: (b, "0"), "must be a byte count"),
        (lambda b, n: (b, "-5"), "must be a byte count"),
        (lambda b, n: (b, "１２"), "must be a byte count"),  # fullwidth digits, which int() takes
        (lambda b, n: (b, "9" * 5000), "must be a byte count"),
        (lambda b, n: (b, ""), "must be a byte count"),
        (lambda b, n: (b, str(int(n) - 1)), "not valid JSON"),
        (lambda b, n: (b, str(int(n) + 1)), "not valid JSON"),
        (lambda b, n: (b.replace(b'"binary_data_size": 32', b'"binary_data_size": 28')[:-4], n), "needs 32"),
    ],
    ids=["truncated", "overlong", "no data", "no header length", "length past body", "zero", "negative",
         "unicode digits", "huge", "empty", "short header", "long header", "size under shape"],
)
def test_truncated_or_overlong_binary_bodies_are_400(mutate, reason):
    body, length = mutate(*binary_classifier_body())
    err = refused(body, length)
    assert err.status == 400 and reason in err.message


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"\x05\x00\x00\x00abc", "claims 5 bytes but only 3 are left"),
        (b"\x01\x00", "ends before element 0"),
        (b"\x01\x00\x00\x00a\x00", "holds 1 bytes after its 1 elements"),
        (b"", "ends before element 0"),
    ],
)
def test_malformed_binary_bytes_tensors_are_400(raw, reason):
    signature = echo_signature("BYTES")
    header = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 1],
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()
    err = refused(header + raw, str(len(header)), {**signature, "inputs": [
        {"name": "x", "datatype": "BYTES", "shape": [-1, 1]}]})
    assert err.status == 400 and reason in err.message


def test_binary_bool_bytes_must_be_0_or_1():
    header = json.dumps({"inputs": [{"name": "x", "datatype": "BOOL", "shape": [1, 3],
                                     "parameters": {"binary_data_size": 3}}]}).encode()
    err = refused(header + b"\x01\x02\x00", str(len(header)), echo_signature("BOOL"))
    assert "0 (false) or 1 (true)" in err.message


def test_zero_size_binary_data_of_an_empty_bytes_element():
    header = json.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1, 3],
                                     "parameters": {"binary_data_size": 12}}]}).encode()
    parsed = parse(header + b"\x00" * 12, str(len(header)), echo_signature("BYTES"))
    assert parsed.inputs["x"].tolist() == [[b"", b"", b""]]


# -- values, shapes and limits ----------------------------------------------------------------------

def test_non_finite_binary_floats_are_refused_unless_allowed():
    x = np.array([[0, np.nan, np.inf, 1]], dtype=np.float32)
    body, length = request([("input", "FP32", x, True)])
    assert "finite FP32" in refused(body, length).message
    np.testing.assert_array_equal(parse(body, length, allow_non_finite=True).inputs["input"], x)


def test_non_finite_json_outputs_are_written_as_nan_and_infinity_literals():
    raw = b'{"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP32", "data": [NaN, 1, 2, 3]}]}'
    parsed = parse(raw, None, allow_non_finite=True)
    outputs = {"probabilities": np.array([[np.nan, np.inf, -np.inf]], np.float32), "label": np.array([0])}
    body, _ = encode_infer_response(model="m", version=1, request=parsed, outputs=outputs, signature=CLASSIFIER)
    assert b"NaN,Infinity,-Infinity" in body
    assert json.loads(body)["outputs"][1]["data"] == [0]


def test_lone_surrogates_are_400_not_a_failure_to_echo_or_encode():
    # orjson refuses a lone surrogate escape; the standard library, which parses what orjson refuses, takes it.
    body = b'{"id": "\\ud800", "inputs": [{"name": "input", "shape": [4], "datatype": "FP32", "data": [0, 1, 2, 3]}]}'
    assert "'id' is not valid Unicode" in refused(body, None).message
    body = b'{"inputs": [{"name": "x", "shape": [1, 3], "datatype": "BYTES", "data": ["a", "\\udc00", "b"]}]}'
    assert "not valid Unicode" in refused(body, None, echo_signature("BYTES")).message


def test_integers_out_of_their_datatype_range_are_400():
    for datatype, value in (("INT8", 128), ("UINT8", -1), ("INT64", 2**63), ("UINT64", 2**64), ("INT32", 1.5)):
        body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [1, 3], "data": [0, value, 0]}]})
        err = refused(body.encode(), None, echo_signature(datatype))
        assert err.status == 400 and ("out of the range" in err.message or "only integers" in err.message)


def test_json_values_must_match_the_datatype():
    for datatype, value, noun in (("BOOL", 1, "booleans"), ("BYTES", 3, "strings"), ("INT64", True, "integers"),
                                  ("FP16", "1", "numbers")):
        body = json.dumps({"inputs": [{"name": "x", "datatype": datatype, "shape": [1, 3], "data": [value] * 3}]})
        assert f"must hold only {noun}" in refused(body.encode(), None, echo_signature(datatype)).message


def test_a_language_model_takes_token_rows_up_to_its_context():
    body, length = request([("input_ids", "INT64", np.arange(12).reshape(2, 6), True)])
    assert parse(body, length, LANGUAGE_MODEL).inputs["input_ids"].shape == (2, 6)
    body, length = request([("input_ids", "INT64", np.arange(14).reshape(2, 7), True)])
    assert "has 7 elements a row; this model takes at most 6" in refused(body, length, LANGUAGE_MODEL).message
    # A body bigger than MAX_ROWS rows of 6 tokens could ever need is refused before it is parsed.
    assert refused(b" " * (MAX_ROWS * 6 * 64 + 65537), None, LANGUAGE_MODEL).status == 413


def test_row_and_body_limits_apply_to_binary_bodies():
    body, length = request([("input", "FP32", np.zeros((MAX_ROWS + 1, 4), np.float32), True)])
    assert refused(body, length).status == 413
    body, length = binary_classifier_body()
    err = refused(body, length, max_body_bytes=len(body) - 1)
    assert err.status == 413 and f"{len(body) - 1} bytes" in err.message


def test_shape_conveniences_of_a_classifier_input():
    values = list(range(8))
    for shape in ([2, 4], [2, 1, 2, 2]):
        raw = json.dumps({"inputs": [{"name": "input", "shape": shape, "datatype": "FP32", "data": values}]})
        assert parse(raw.encode(), None).inputs["input"].shape == (2, 4)
    body, length = request([("input", "FP32", np.zeros((2, 1, 2, 2), np.float32), True)])
    assert parse(body, length).inputs["input"].shape == (2, 4)
    err = refused(*request([("input", "FP32", np.zeros((2, 2, 2), np.float32), True)]))
    assert "send [N, 4], [N, *[1, 2, 2]] or [4] for one row" in err.message


# -- metadata and schemas -------------------------------------------------------------------------

def test_server_and_model_metadata():
    assert project_version() == installed_version("orchestrator")
    assert server_metadata(project_version()) == {
        "name": "orchestrator", "version": installed_version("orchestrator"), "extensions": ["binary_tensor_data"]}
    metadata = model_metadata("digits", [3, 4], CLASSIFIER)
    assert metadata == {"name": "digits", "versions": ["3", "4"], "platform": "pytorch",
                        "inputs": CLASSIFIER["inputs"], "outputs": CLASSIFIER["outputs"]}


def test_schemas_describe_the_bodies_the_parser_takes_and_writes():
    body, length = request([("input", "FP32", np.ones((2, 4), np.float32), True)], id="s",
                           outputs=[{"name": "label", "parameters": {"binary_data": True}}, {"name": "probabilities"}])
    parsed = parse(body, length)
    InferenceRequest.model_validate(orjson.loads(body[:int(length or 0)]))
    raw, headers = encode_infer_response(model="m", version=1, request=parsed, outputs=classify(parsed),
                                         signature=CLASSIFIER)
    response = InferenceResponse.model_validate(read_response(raw, headers)[0])
    assert response.id == "s" and [o.name for o in response.outputs] == ["label", "probabilities"]
    schema = infer_openapi_extra()["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in json.dumps(schema) and schema["properties"]["inputs"]["items"]["properties"]["datatype"]


# -- fuzzing: only ever BadRequest 4xx, or a request that encodes ----------------------------------

def answer_or_refusal(body: bytes, header_length: Optional[str], signature: Dict[str, Any]) -> None:
    try:
        parsed = parse(body, header_length, signature)
    except BadRequest as err:
        assert 400 <= err.status < 500 and err.message
        return
    outputs = {t["name"]: np.zeros([parsed.rows, *[max(d, 1) for d in t["shape"][1:]]], NUMPY[t["datatype"]])
               for t in signature["outputs"]}
    try:
        raw, headers = encode_infer_response(model="m", version=1, request=parsed, outputs=outputs,
                                             signature=signature)
    except BadRequest as err:
        assert err.status == 400
        return
    read_response(raw, headers)


SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=5),
                    st.sampled_from([0, 1, 2, 3, -1, 2**31, 2**64, "FP32", "BYTES", "INT64", "label", "tag", "input"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(["name", "binary_data_size", "binary_data", "shape", "data", "x"]), inner, max_size=3),
    max_leaves=12)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def perturbed(data: st.DataObject, value: Any, depth: int = 0) -> Any:
    """`value` with one part, chosen at random, replaced by random JSON or deleted."""
    if isinstance(value, (dict, list)) and value and (depth == 0 or data.draw(st.integers(0, 4)) > 0):
        copy: Any = dict(value) if isinstance(value, dict) else list(value)
        key = data.draw(st.sampled_from(list(copy) if isinstance(copy, dict) else range(len(copy))))
        if data.draw(st.integers(0, 5)) == 0:
            del copy[key]
        else:
            copy[key] = perturbed(data, copy[key], depth + 1)
        return copy
    return data.draw(JSON_VALUES)


def valid_multi_request() -> Tuple[Dict[str, Any], bytes]:
    body, length = request(multi_inputs(2), id="f", parameters={"binary_data_output": False},
                           outputs=[{"name": "tag", "parameters": {"binary_data": True}}, {"name": "score"}])
    assert length is not None
    return json.loads(body[:int(length)]), body[int(length):]


@FUZZ
@given(body=st.binary(max_size=300), header=st.none() | st.text(max_size=6) | st.integers(-3, 310).map(str))
def test_fuzz_random_bytes(body, header):
    answer_or_refusal(body, header, CLASSIFIER)


@FUZZ
@given(data=st.data())
def test_fuzz_perturbed_valid_requests(data):
    payload, tail = valid_multi_request()
    for _ in range(data.draw(st.integers(1, 3))):
        payload = perturbed(data, payload)
    header = json.dumps(payload).encode()
    framing = data.draw(st.sampled_from(["exact"] * 6 + ["none", "off"]))
    length = {"exact": str(len(header)), "none": None, "off": str(max(1, len(header) - 3))}[framing]
    answer_or_refusal(header + tail, length, data.draw(st.sampled_from([MULTI] * 4 + [CLASSIFIER, LANGUAGE_MODEL])))


@FUZZ
@given(data=st.data())
def test_fuzz_mutated_valid_binary_requests(data):
    payload, tail = valid_multi_request()
    header = json.dumps(payload).encode()
    raw = bytearray(header + tail)
    for _ in range(data.draw(st.integers(1, 3))):
        # Half the changes hit the binary data, which is a small part of the body.
        at = data.draw(st.integers(len(header), len(raw) - 1) | st.integers(0, len(raw) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del raw[at:at + data.draw(st.integers(1, 8))]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=4))
    length = data.draw(st.sampled_from([len(header)] * 6 + [len(header) - 1, len(header) + 2]))
    answer_or_refusal(bytes(raw), str(length), MULTI)


# -- tritonclient, the protocol's standard Python client, with its default settings ----------------

def triton_round_trip(inputs, outputs, signature, model_outputs, **options):
    """tritonclient's request body through our parser, our response through tritonclient's parser."""
    http = pytest.importorskip("tritonclient.http")
    body, json_size = http.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **options)
    parsed = parse(body, None if json_size is None else str(json_size), signature)
    raw, headers = encode_infer_response(model="m", version=1, request=parsed, outputs=model_outputs(parsed),
                                         signature=signature)
    length = headers.get("Inference-Header-Content-Length")
    return parsed, http.InferenceServerClient.parse_response_body(raw, header_length=None if length is None
                                                                  else int(length))


def test_tritonclient_default_request_and_response():
    http = pytest.importorskip("tritonclient.http")
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    infer_input = http.InferInput("input", [3, 4], "FP32")
    infer_input.set_data_from_numpy(x)  # binary by default
    parsed, result = triton_round_trip([infer_input], None, CLASSIFIER, classify, request_id="t-1")
    np.testing.assert_array_equal(parsed.inputs["input"], x)
    assert parsed.binary_outputs == {"probabilities": True, "label": True}  # tritonclient asks for binary
    np.testing.assert_array_equal(result.as_numpy("probabilities"), classify(parsed)["probabilities"])
    np.testing.assert_array_equal(result.as_numpy("label"), classify(parsed)["label"])
    assert result.get_response()["id"] == "t-1"


def test_tritonclient_json_tensors_and_selected_outputs():
    http = pytest.importorskip("tritonclient.http")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    infer_input = http.InferInput("input", [2, 4], "FP32")
    infer_input.set_data_from_numpy(x, binary_data=False)
    outputs = [http.InferRequestedOutput("label", binary_data=False)]
    parsed, result = triton_round_trip([infer_input], outputs, CLASSIFIER, classify)
    assert parsed.outputs == ["label"] and result.as_numpy("probabilities") is None
    np.testing.assert_array_equal(result.as_numpy("label"), classify(parsed)["label"])


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", sorted(DATATYPES))
def test_tritonclient_every_datatype(datatype, binary):
    http = pytest.importorskip("tritonclient.http")
    if datatype == "BF16" and not binary:
        pytest.skip("tritonclient sends BF16 only as binary data")
    values = sample(datatype, binary=binary)
    if datatype == "BF16":
        values = values.astype(pytest.importorskip("ml_dtypes").bfloat16)
    infer_input = http.InferInput("x", [2, 3], datatype)
    infer_input.set_data_from_numpy(values, binary_data=binary)
    outputs = [http.InferRequestedOutput("y", binary_data=binary)]
    parsed, result = triton_round_trip([infer_input], outputs, echo_signature(datatype),
                                       lambda parsed: {"y": parsed.inputs["x"]})
    np.testing.assert_array_equal(parsed.inputs["x"], values.astype(NUMPY[datatype]) if datatype != "BYTES"
                                  else values)
    echoed = result.as_numpy("y")
    assert echoed.shape == (2, 3)
    if datatype == "BYTES":  # tritonclient gives JSON BYTES back as the strings they are
        assert echoed.tolist() == (values.tolist() if binary else [[v.decode() for v in row] for row in values])
    else:
        np.testing.assert_array_equal(echoed.astype(NUMPY[datatype]), values.astype(NUMPY[datatype]))
