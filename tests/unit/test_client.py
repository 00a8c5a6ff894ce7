"""orchestrator.client against a small Open Inference Protocol v2 server on loopback (no Ray).

The server decodes requests with tritonclient's own decoder (it reads a request's inputs as if they
were a response's outputs) and echoes every input back as an output of the same name, in binary or
JSON as asked; faults are scripted per request (503, Retry-After, dropped or closed connections,
slow answers). So a round trip that comes back equal went through an independent implementation
of the wire format both ways, and the request bytes are also compared with tritonclient's own.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List, Optional, Tuple

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from orchestrator.client import Client, InferenceError, check_endpoint, http_json, wait_until_ready
from tests.support import REPO, free_port

KEY = "orc_test_key"


# -- the server ----------------------------------------------------------------------------------


@dataclass
class _Seen:
    method: str
    path: str
    headers: Dict[str, str]
    body: bytes
    port: int


@dataclass
class _State:
    """What the server does and what it saw. `faults` are taken one per request, in order:
    "503" (no Retry-After), "503:<value>" (that Retry-After), "drop" (close without answering),
    "close-after" (answer, then close the connection silently), "sleep:<s>" (answer late)."""

    key: Optional[str] = KEY
    ready: bool = True
    faults: List[str] = field(default_factory=list)
    seen: List[_Seen] = field(default_factory=list)

    def infer_requests(self) -> List[_Seen]:
        return [s for s in self.seen if s.path.endswith("/infer")]


MODELS = {"echo": ["a", "b"], "single": ["x"], "digits": ["input"]}
"""Model name -> the inputs its metadata declares (every model echoes whatever it is sent)."""


def _decode_inputs(body: bytes, header_length: Optional[int]) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(request JSON, {input: array}) decoded by tritonclient: the inputs read as a response's outputs."""
    cut = len(body) if header_length is None else header_length
    request = json.loads(body[:cut])
    as_response = json.dumps({"outputs": request["inputs"]}).encode()
    result = triton.InferResult.from_response_body(
        as_response + body[cut:], header_length=None if header_length is None else len(as_response))
    return request, {tensor["name"]: result.as_numpy(tensor["name"]) for tensor in request["inputs"]}


def _encode_output(name: str, array: np.ndarray, binary: bool) -> Tuple[Dict[str, Any], bytes]:
    datatype = np_to_triton_dtype(array.dtype)
    entry: Dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": datatype}
    if binary:
        raw = serialize_byte_tensor(array).item() if datatype == "BYTES" and array.size else array.tobytes()
        entry["parameters"] = {"binary_data_size": len(raw)}
        return entry, raw
    if datatype == "BYTES":
        entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()]
    else:
        entry["data"] = array.astype(np.float32 if datatype == "BF16" else array.dtype).ravel().tolist()
    return entry, b""


def _infer_answer(path: str, body: bytes, header_length: Optional[int]) -> Tuple[int, Dict[str, str], bytes]:
    parts = path.strip("/").split("/")  # v2 models <name> [versions <v>] infer
    version = parts[4] if len(parts) == 6 else "1"
    request, arrays = _decode_inputs(body, header_length)
    wanted = request.get("outputs") or [{"name": name} for name in arrays]
    unknown = [o["name"] for o in wanted if o["name"] not in arrays]
    if unknown:
        return _json(400, {"error": f"unknown output {unknown[0]!r}; the model has {list(arrays)}"})
    all_binary = (request.get("parameters") or {}).get("binary_data_output", False)
    encoded = [_encode_output(o["name"], arrays[o["name"]], (o.get("parameters") or {}).get("binary_data", all_binary))
               for o in wanted]
    answer: Dict[str, Any] = {"model_name": parts[2], "model_version": version}
    if "id" in request:
        answer["id"] = request["id"]
    answer["outputs"] = [entry for entry, _ in encoded]
    header = json.dumps(answer).encode()
    blobs = b"".join(raw for _, raw in encoded)
    headers = {"Content-Type": "application/json", "X-Model-Version": version}
    if blobs or any("parameters" in entry for entry in answer["outputs"]):
        headers["Inference-Header-Content-Length"] = str(len(header))
    return 200, headers, header + blobs


def _json(status: int, body: Any, headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **(headers or {})}, json.dumps(body).encode()


def _route(state: _State, method: str, path: str, headers: Dict[str, str], body: bytes):
    if path == "/v2":
        return _json(200, {"name": "v2-test", "version": "1", "extensions": ["binary_tensor_data"]})
    if path == "/v2/health/live":
        return _json(200, {"live": True})
    if path == "/v2/health/ready":
        return _json(200, {"ready": True}) if state.ready else _json(503, {"error": "not ready"})
    if state.key and headers.get("authorization") != f"Bearer {state.key}":
        return _json(401, {"error": "missing or invalid API key"}, {"WWW-Authenticate": "Bearer"})
    if path == "/v2/models":
        return _json(200, {"models": [{"name": name, "versions": ["1"]} for name in MODELS]})
    parts = path.strip("/").split("/")
    if len(parts) < 3 or parts[2] not in MODELS:
        return _json(404, {"error": f"no route {method} {path}"})
    if method == "POST" and parts[-1] == "infer":
        length = headers.get("inference-header-content-length")
        return _infer_answer(path, body, int(length) if length else None)
    if parts[-1] == "ready":
        return _json(200, {"name": parts[2], "ready": True})
    versions = [parts[4]] if len(parts) == 5 else ["1"]
    inputs = [{"name": name, "datatype": "FP32", "shape": [-1]} for name in MODELS[parts[2]]]
    return _json(200, {"name": parts[2], "versions": versions, "platform": "echo", "inputs": inputs, "outputs": inputs})


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real server
    timeout = 10  # an idle keep-alive connection's thread ends on its own

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        state: _State = self.server.state  # type: ignore[attr-defined]
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        headers = {k.lower(): v for k, v in self.headers.items()}
        state.seen.append(_Seen(self.command, self.path, headers, body, self.client_address[1]))
        fault = state.faults.pop(0) if state.faults else ""
        if fault == "drop":
            self.close_connection = True
            return
        if fault.startswith("sleep:"):
            time.sleep(float(fault.split(":", 1)[1]))
        if fault.startswith("503"):
            retry_after = {"Retry-After": fault.split(":", 1)[1]} if ":" in fault else {}
            status, out_headers, raw = _json(503, {"error": "busy"}, retry_after)
        else:
            status, out_headers, raw = _route(state, self.command, self.path, headers, body)
        self.send_response(status)
        for name, value in {**out_headers, "Content-Length": str(len(raw))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(raw)
        if fault == "close-after":
            self.close_connection = True  # no "Connection: close": the client learns on its next request

    def log_message(self, *args: Any) -> None:
        pass


def _start(state: _State, port: int = 0) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    server.state = state  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return server


@pytest.fixture()
def v2() -> Iterator[Tuple[str, _State]]:
    state = _State()
    server = _start(state)
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


@pytest.fixture()
def client(v2) -> Iterator[Client]:
    with Client(v2[0], api_key=KEY, backoff_s=0.01) as c:
        yield c


# -- every datatype, both wire formats ------------------------------------------------------------

_rng = np.random.default_rng(0)
SAMPLES: Dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    **{f"INT{bits}": np.array([np.iinfo(f"int{bits}").min, -1, 0, np.iinfo(f"int{bits}").max], f"int{bits}")
       for bits in (8, 16, 32, 64)},
    **{f"UINT{bits}": np.array([0, 1, np.iinfo(f"uint{bits}").max], f"uint{bits}") for bits in (8, 16, 32, 64)},
    "FP16": np.array([-65504.0, -0.5, 6.1e-5, 0.0, 65504.0], np.float16),
    "FP32": _rng.standard_normal((3, 4)).astype(np.float32),
    "FP64": np.array([1e-300, -np.pi, 2.0**60 + 1, 1 / 3]),
    "BYTES": np.array([[b"", b"a\x00b"], [b"text", "\u00e9t\u00e9".encode()]], dtype=object),
}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("datatype", list(SAMPLES))
def test_every_datatype_round_trips_exactly(client, v2, datatype, binary):
    sent = SAMPLES[datatype]
    result = client.infer("echo", {"t": sent}, binary=binary)
    got = result["t"]
    assert got.dtype == sent.dtype and got.shape == sent.shape
    assert got.tolist() == sent.tolist() if datatype == "BYTES" else np.array_equal(got, sent)
    (seen,) = v2[1].infer_requests()
    assert json.loads(seen.body[:int(seen.headers.get("inference-header-content-length", len(seen.body)))])[
        "inputs"][0]["datatype"] == datatype
    sent_as = "application/octet-stream" if binary else "application/json"
    assert seen.headers["content-type"] == sent_as
    assert ("inference-header-content-length" in seen.headers) == binary
    # The answer came back in the same format as the request.
    assert ("parameters" in result.response["outputs"][0]) == binary


def test_several_inputs_in_one_request_and_outputs_select_what_comes_back(client):
    inputs = {"a": np.arange(4, dtype=np.int32), "b": np.array([b"x", b"yz"], dtype=object), "c": np.eye(2)}
    everything = client.infer("echo", inputs)
    assert list(everything.outputs) == ["a", "b", "c"]
    chosen = client.infer("echo", inputs, outputs=["c", "a"])
    assert list(chosen.outputs) == ["c", "a"]
    assert np.array_equal(chosen["c"], np.eye(2)) and np.array_equal(chosen["a"], np.arange(4))
    with pytest.raises(KeyError, match="no output 'b'"):
        chosen["b"]
    with pytest.raises(InferenceError, match="unknown output 'zz'") as err:
        client.infer("echo", inputs, outputs=["zz"])
    assert err.value.status == 400 and err.value.body == {"error": err.value.message}


def test_scalars_empty_tensors_and_str_arrays(client):
    inputs = {"s": np.float32(2.5), "e": np.zeros((0, 3), np.int64), "u": np.array(["h\u00e9llo", ""])}
    for binary in (True, False):
        got = client.infer("echo", inputs, binary=binary)
        assert got["s"].shape == () and got["s"] == np.float32(2.5)
        assert got["e"].shape == (0, 3) and got["e"].dtype == np.int64
        assert got["u"].tolist() == ["h\u00e9llo".encode(), b""]  # str goes as UTF-8, BYTES come back as bytes


def test_binary_carries_what_json_cannot(client):
    special = np.array([np.nan, np.inf, -np.inf, -0.0], np.float32)
    raw_bytes = np.array([b"\xff\xfe", b"\x00"], dtype=object)
    got = client.infer("echo", {"f": special, "r": raw_bytes})
    assert got["f"].tobytes() == special.tobytes() and got["r"].tolist() == [b"\xff\xfe", b"\x00"]
    with pytest.raises(ValueError, match="input 'f' holds NaN or infinity"):
        client.infer("echo", {"f": special}, binary=False)
    with pytest.raises(ValueError, match="input 'r'.*not UTF-8"):
        client.infer("echo", {"r": raw_bytes}, binary=False)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_bf16_from_floats_or_ml_dtypes_comes_back_as_exact_float32(client, v2, binary):
    exact = np.array([1.0, -2.5, 0.15625, 3.0e38, 2.0**-130], np.float32).astype(ml_dtypes.bfloat16)
    got = client.infer("echo", {"m": exact}, binary=binary)["m"]
    assert got.dtype == np.float32 and np.array_equal(got, exact.astype(np.float32))
    # A float array sent as BF16 is rounded to nearest even, as torch and ml_dtypes round it.
    floats = np.array([1.00390625, 1.01171875, -7.3], np.float32)
    rounded = client.infer("echo", {"f": floats}, datatypes={"f": "BF16"}, binary=binary)["f"]
    assert np.array_equal(rounded, floats.astype(ml_dtypes.bfloat16).astype(np.float32))
    assert rounded[0] == 1.0 and rounded[1] == 1.015625


def test_a_datatype_override_casts_the_array(client, v2):
    got = client.infer("echo", {"ids": np.array([1, 2, 3])}, datatypes={"ids": "INT32"})
    assert got["ids"].dtype == np.int32 and got["ids"].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"datatypes\['ids'\] = 'FP8'"):
        client.infer("echo", {"ids": np.array([1])}, datatypes={"ids": "FP8"})
    with pytest.raises(ValueError, match="input 'z'.*complex64"):
        client.infer("echo", {"z": np.zeros(2, np.complex64)})
    with pytest.raises(ValueError, match="input 'n': BYTES needs"):
        client.infer("echo", {"n": np.zeros(2)}, datatypes={"n": "BYTES"})


def test_version_id_parameters_and_response_headers(client, v2):
    result = client.infer("echo", {"a": np.ones(2, np.float32)}, version=2, request_id="req-7",
                          parameters={"priority": 1})
    assert (result.model_name, result.model_version, result.id) == ("echo", "2", "req-7")
    assert result.headers["x-model-version"] == "2"
    (seen,) = v2[1].infer_requests()
    assert seen.path == "/v2/models/echo/versions/2/infer"
    assert seen.headers["authorization"] == f"Bearer {KEY}"
    header = json.loads(seen.body[:int(seen.headers["inference-header-content-length"])])
    assert header["id"] == "req-7" and header["parameters"] == {"binary_data_output": True, "priority": 1}


def test_one_array_goes_to_the_models_only_input_named_by_its_metadata(client, v2):
    for value in (1.0, 2.0):
        assert client.infer("single", np.full(3, value, np.float32))["x"].tolist() == [value] * 3
    assert [s.path for s in v2[1].seen if s.method == "GET"] == ["/v2/models/single"]  # read once
    with pytest.raises(ValueError, match=r"takes inputs \['a', 'b'\]"):
        client.infer("echo", np.ones(3))


# -- byte for byte what tritonclient sends, and what it reads ------------------------------------


def _triton_inputs(arrays: Dict[str, np.ndarray]) -> List[triton.InferInput]:
    inputs = []
    for name, array in arrays.items():
        tensor = triton.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
        inputs.append(tensor.set_data_from_numpy(array))
    return inputs


@pytest.mark.parametrize("outputs", [None, ["b", "a"]], ids=["all-outputs", "chosen-outputs"])
def test_binary_request_bytes_are_exactly_tritonclients(v2, outputs):
    base_url, state = v2
    arrays = {"a": SAMPLES["FP32"], "b": SAMPLES["INT64"], "c": SAMPLES["BOOL"], "d": SAMPLES["BYTES"],
              "e": SAMPLES["FP16"], "f": SAMPLES["UINT8"], "g": np.zeros((0, 2), np.float64)}
    theirs = triton.InferenceServerClient(base_url.removeprefix("http://"))
    try:
        requested = [triton.InferRequestedOutput(name) for name in outputs] if outputs else None
        their_result = theirs.infer("echo", _triton_inputs(arrays), outputs=requested, request_id="r1",
                                    headers={"Authorization": f"Bearer {KEY}"})
    finally:
        theirs.close()
    with Client(base_url, api_key=KEY) as ours:
        our_result = ours.infer("echo", arrays, outputs=outputs, request_id="r1")
    their_request, our_request = state.infer_requests()
    assert our_request.body == their_request.body
    length = "inference-header-content-length"
    assert our_request.headers[length] == their_request.headers[length]
    for name in outputs or arrays:  # the same answer, decoded by each client, is the same arrays
        assert np.array_equal(our_result[name], their_result.as_numpy(name)), name


# -- retries, errors, connections ---------------------------------------------------------------


def test_a_503_with_retry_after_is_waited_out_then_retried(client, v2):
    v2[1].faults[:] = ["503:1"]
    started = time.monotonic()
    assert client.infer("echo", {"a": np.ones(1)})["a"].tolist() == [1.0]
    assert time.monotonic() - started >= 1.0  # it waited what Retry-After said
    assert len(v2[1].infer_requests()) == 2


def test_retry_after_as_an_http_date_and_a_503_without_one_are_retried(client, v2):
    v2[1].faults[:] = [f"503:{formatdate(time.time() - 5, usegmt=True)}", "503"]
    assert client.infer("echo", {"a": np.ones(1)})["a"].tolist() == [1.0]
    assert len(v2[1].infer_requests()) == 3


def test_a_503_forever_raises_after_the_retries(v2):
    base_url, state = v2
    state.faults[:] = ["503:0"] * 10
    with Client(base_url, api_key=KEY, retries=2) as c, pytest.raises(InferenceError, match="503: busy") as err:
        c.infer("echo", {"a": np.ones(1)})
    assert err.value.status == 503 and err.value.message == "busy"
    assert len(state.infer_requests()) == 3


def test_a_retry_after_past_the_timeout_raises_at_once(v2):
    base_url, state = v2
    state.faults[:] = ["503:30"]
    started = time.monotonic()
    with Client(base_url, api_key=KEY, timeout_s=2) as c, pytest.raises(InferenceError, match="503"):
        c.infer("echo", {"a": np.ones(1)})
    assert time.monotonic() - started < 1.0 and len(state.infer_requests()) == 1


def test_a_refused_key_raises_with_the_servers_message_and_is_not_retried(v2):
    base_url, state = v2
    with Client(base_url, api_key="wrong") as c, pytest.raises(InferenceError) as err:
        c.infer("echo", {"a": np.ones(1)})
    assert (err.value.status, err.value.message) == (401, "missing or invalid API key")
    assert "answered 401: missing or invalid API key" in str(err.value)
    assert len(state.infer_requests()) == 1


def test_a_dropped_connection_is_retried(client, v2):
    v2[1].faults[:] = ["drop", "drop"]
    assert client.infer("echo", {"a": np.ones(2)})["a"].tolist() == [1.0, 1.0]
    assert len(v2[1].infer_requests()) == 3


def test_connection_refused_is_retried_until_the_server_listens(v2):
    port = free_port()
    late = threading.Timer(0.3, lambda: servers.append(_start(_State(key=None), port)))
    servers: List[ThreadingHTTPServer] = []
    late.start()
    try:
        with Client(f"http://127.0.0.1:{port}", retries=6, backoff_s=0.05) as c:
            assert c.infer("echo", {"a": np.arange(3)})["a"].tolist() == [0, 1, 2]
    finally:
        late.join()
        for server in servers:
            server.shutdown()
            server.server_close()
    with Client(f"http://127.0.0.1:{free_port()}", retries=2, backoff_s=0.01) as c:
        with pytest.raises(ConnectionError, match="no answer after 3 tries"):
            c.live()


def test_a_slow_answer_past_the_timeout_raises_timeout_error(v2):
    base_url, state = v2
    state.faults[:] = ["sleep:1.5"]
    started = time.monotonic()
    with Client(base_url, api_key=KEY, timeout_s=0.3) as c, pytest.raises(TimeoutError, match="timeout_s=0.3"):
        c.infer("echo", {"a": np.ones(1)})
    assert time.monotonic() - started < 1.2


def test_one_keep_alive_connection_per_thread_and_a_closed_one_is_reopened(v2):
    base_url, state = v2
    with Client(base_url, api_key=KEY, retries=0) as c:
        for i in range(5):
            assert c.infer("echo", {"a": np.full(2, i)})["a"].tolist() == [i, i]
        assert len({s.port for s in state.seen}) == 1
        state.faults[:] = ["close-after"]
        c.infer("echo", {"a": np.ones(1)})
        # The server closed the idle connection: the next call reconnects without spending a retry.
        assert c.infer("echo", {"a": np.ones(1)})["a"].tolist() == [1.0]
        assert len({s.port for s in state.seen}) == 2
        state.seen.clear()
        with ThreadPoolExecutor(max_workers=4) as pool:
            answers = list(pool.map(lambda i: c.infer("echo", {"a": np.full(3, i)})["a"].tolist(), range(40)))
    assert answers == [[i] * 3 for i in range(40)]
    assert 1 <= len({s.port for s in state.seen}) <= 4  # at most one connection per thread


# -- metadata and health ------------------------------------------------------------------------


def test_metadata_model_index_and_health(client, v2):
    assert client.server_metadata()["extensions"] == ["binary_tensor_data"]
    assert [m["name"] for m in client.models()] == list(MODELS)
    assert client.model_metadata("echo", version=3)["versions"] == ["3"]
    assert v2[1].seen[-1].path == "/v2/models/echo/versions/3"
    assert client.live() and client.ready() and client.model_ready("echo") and client.model_ready("echo", 2)
    v2[1].ready = False
    assert not client.ready()
    assert [s.path for s in v2[1].seen].count("/v2/health/ready") == 2  # "not ready" is an answer, not retried
    with pytest.raises(InferenceError, match="answered 404"):
        client.model_metadata("nope")


def test_bad_settings_name_the_field(v2):
    with pytest.raises(ValueError, match="base_url='ftp://x'"):
        Client("ftp://x")
    with pytest.raises(ValueError, match="timeout_s=0"):
        Client(v2[0], timeout_s=0)
    with pytest.raises(ValueError, match="retries=-1"):
        Client(v2[0], retries=-1)
    with Client(v2[0]) as c, pytest.raises(ValueError, match="binary_data_output"):
        c.infer("echo", {"a": np.ones(1)}, parameters={"binary_data_output": False})


# -- the small calls ----------------------------------------------------------------------------


def test_importing_the_client_loads_neither_torch_nor_ray():
    heavy = ("torch", "ray", "ray.serve", "tritonclient", "serve")
    probe = f"import sys, orchestrator.client; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@dataclass(frozen=True)
class _Deployment:
    endpoint: str
    api_key: Optional[str]


def test_check_endpoint_sends_json_rows_with_the_key_and_raises_when_refused(v2):
    base_url, state = v2
    wait_until_ready(base_url, timeout_s=5)
    endpoint = f"{base_url}/v2/models/digits"
    answer = check_endpoint(_Deployment(endpoint, KEY), np.arange(6).reshape(2, 3))
    assert answer["id"] == "check_endpoint" and answer["outputs"][0]["data"] == [0, 1, 2, 3, 4, 5]
    sent = json.loads(state.infer_requests()[0].body)
    assert sent == {"id": "check_endpoint",
                    "inputs": [{"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5]}]}
    with pytest.raises(RuntimeError, match="answered 401"):
        check_endpoint(_Deployment(endpoint, None), np.zeros((1, 3)))


def test_http_json_answers_any_status_and_sends_once(v2):
    base_url, state = v2
    assert http_json("GET", f"{base_url}/v2/models/nowhere", api_key=KEY) == (404, {
        "error": "no route GET /v2/models/nowhere"})
    state.faults[:] = ["503:0"]
    assert http_json("POST", f"{base_url}/v2/models/echo/infer", {"inputs": []}, api_key=KEY)[0] == 503
    assert len(state.seen) == 2  # no retry: admin calls such as promote are not idempotent


def test_wait_until_ready_times_out_on_a_server_that_is_not_ready(v2):
    v2[1].ready = False
    with pytest.raises(TimeoutError, match="did not answer 200 within 0.5 s"):
        wait_until_ready(v2[0], timeout_s=0.5)
