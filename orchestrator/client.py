"""The HTTP client of a running deployment: the Open Inference Protocol v2 over REST, numpy in and out,
and OpenAI-compatible text completions of its language models (whole, or streamed).

`Client` makes the protocol's infer, metadata and health calls with the API key, over one persistent
(keep-alive) connection per thread, with tensors in the binary tensor data extension (Triton/KServe:
a JSON header, then each tensor's raw little-endian bytes) or in plain JSON. Within one deadline
per call it retries a 503 (waiting what Retry-After says) and a refused or dropped connection (a
completion also a 429: the model's queue was full); other errors raise `InferenceError` with the
server's message. `http_json`, `wait_until_ready` and
`check_endpoint` are the small calls the jobs and deploys make.

Standard library and numpy only (no torch, no Ray): jobs that only talk to a running deployment,
such as `jobs.rollout`, start fast and run anywhere.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Protocol, Sequence, Tuple, Union
from urllib.parse import quote, urlsplit

import numpy as np

API_KEY_ENV = "ORCHESTRATOR_API_KEY"
"""Environment variable holding the API key that clients and deployments use."""

# -- datatypes: numpy <-> the protocol's names -------------------------------------------------------

_NUMPY_OF: Dict[str, np.dtype] = {
    name: np.dtype(t) for name, t in [
        ("BOOL", np.bool_), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32), ("INT64", np.int64),
        ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32), ("UINT64", np.uint64),
        ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
    ]
}
# Keyed by (kind, itemsize) so that a big-endian array maps like a native one.
_DATATYPE_OF: Dict[Tuple[str, int], str] = {(d.kind, d.itemsize): name for name, d in _NUMPY_OF.items()}

DATATYPES = (*_NUMPY_OF, "BF16", "BYTES")
"""Every tensor datatype the client sends and decodes."""

Inputs = Union[Mapping[str, Any], np.ndarray]
"""What `Client.infer` takes: {input name: array}, or one array for a model with one input."""


def datatype_of(array: np.ndarray) -> str:
    """The protocol's datatype for `array`'s dtype: bool, (u)int8-64 and float16/32/64 by name;
    object, bytes and str arrays are BYTES; ml_dtypes' bfloat16 is BF16. Raises ValueError otherwise."""
    dtype = array.dtype
    if dtype.name == "bfloat16":  # ml_dtypes.bfloat16, recognised without importing ml_dtypes
        return "BF16"
    if dtype.kind in "OSU":
        return "BYTES"
    if (dtype.kind, dtype.itemsize) in _DATATYPE_OF:
        return _DATATYPE_OF[(dtype.kind, dtype.itemsize)]
    raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype; one of {list(DATATYPES)} "
                     "fits bool, (u)int8-64, float16/32/64 and object/bytes/str arrays")


def _bf16_bits(array: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns of `array`: ml_dtypes' as they are, floats rounded to nearest even."""
    if array.dtype.name == "bfloat16":
        return array.view(np.uint16)
    values = np.asarray(array, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    # A NaN's payload could round up into the sign bit; keep it a quiet NaN with its own sign.
    quiet_nan = ((bits >> 16) & 0x8000 | 0x7FC0).astype(np.uint16)
    return np.where(np.isnan(values), quiet_nan, rounded).astype(np.uint16)


def _bf16_values(bits: np.ndarray) -> np.ndarray:
    """float32 array holding exactly the bfloat16 values `bits` (numpy has no bfloat16 of its own)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _elements(array: np.ndarray) -> List[bytes]:
    """A BYTES tensor's elements, row-major, as bytes: str is UTF-8 encoded, anything else str()'d."""
    return [item if isinstance(item, bytes) else str(item).encode() for item in array.ravel(order="C").tolist()]


# -- tensors: encode a request, decode a response -------------------------------------------------


@dataclass(frozen=True)
class _Tensor:
    name: str
    datatype: str
    array: np.ndarray

    def raw(self) -> bytes:
        """The tensor in the binary extension's layout: little-endian, row-major, no padding; each
        BYTES element a 4-byte little-endian length, then its bytes."""
        if self.datatype == "BYTES":
            return b"".join(struct.pack("<I", len(item)) + item for item in _elements(self.array))
        if self.datatype == "BF16":
            return _bf16_bits(self.array).astype("<u2").tobytes()
        return self.array.astype(_NUMPY_OF[self.datatype].newbyteorder("<"), copy=False).tobytes()

    def json_data(self) -> List[Any]:
        """The tensor's elements as JSON values, row-major. Raises ValueError for what JSON cannot hold."""
        if self.datatype == "BYTES":
            try:
                return [item.decode() for item in _elements(self.array)]
            except UnicodeDecodeError:
                raise ValueError(f"input {self.name!r}: a BYTES element is not UTF-8 text, which JSON cannot "
                                 "carry; send it with binary=True") from None
        values = _bf16_values(_bf16_bits(self.array)) if self.datatype == "BF16" else self.array
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            raise ValueError(f"input {self.name!r} holds NaN or infinity, which JSON cannot carry; "
                             "send it with binary=True")
        return values.ravel().tolist()


def _tensor(name: str, value: Any, datatype: Optional[str]) -> _Tensor:
    """Input `name` as a tensor of `datatype` (default: the array's own), cast where they differ."""
    array = np.asarray(value)
    try:
        datatype = datatype or datatype_of(array)
    except ValueError as err:
        raise ValueError(f"input {name!r}: {err}") from None
    if datatype not in DATATYPES:
        raise ValueError(f"datatypes[{name!r}] = {datatype!r}; expected one of {list(DATATYPES)}")
    if datatype == "BYTES" and array.dtype.kind not in "OSU":
        raise ValueError(f"input {name!r}: BYTES needs an object, bytes or str array, not {array.dtype}")
    if datatype in _NUMPY_OF and array.dtype != _NUMPY_OF[datatype]:
        array = array.astype(_NUMPY_OF[datatype])
    return _Tensor(name, datatype, array)


def _encode_request(
    tensors: Sequence[_Tensor], *, binary: bool, outputs: Optional[Sequence[str]] = None,
    request_id: Optional[str] = None, parameters: Optional[Mapping[str, Any]] = None,
) -> Tuple[bytes, Optional[int]]:
    """(body, JSON header length or None) of an infer request. With `binary`, every input travels
    as raw bytes after the header and every output is asked for in binary, laid out byte for byte
    as tritonclient.http lays it out; otherwise the body is the protocol's plain JSON."""
    header: Dict[str, Any] = {}
    if request_id:
        header["id"] = request_id
    blobs = [tensor.raw() for tensor in tensors] if binary else []
    sizes: Sequence[Optional[int]] = [len(blob) for blob in blobs] if binary else [None] * len(tensors)
    header["inputs"] = [_input_header(tensor, size) for tensor, size in zip(tensors, sizes)]
    if outputs:
        header["outputs"] = [{"name": name, **({"parameters": {"binary_data": True}} if binary else {})}
                             for name in outputs]
    request_parameters: Dict[str, Any] = {"binary_data_output": True} if binary and not outputs else {}
    request_parameters.update(parameters or {})
    if request_parameters:
        header["parameters"] = request_parameters
    encoded = json.dumps(header, separators=(",", ":")).encode()
    return (encoded + b"".join(blobs), len(encoded)) if blobs else (encoded, None)


def _input_header(tensor: _Tensor, binary_size: Optional[int]) -> Dict[str, Any]:
    entry: Dict[str, Any] = {"name": tensor.name, "shape": list(tensor.array.shape), "datatype": tensor.datatype}
    if binary_size is None:
        entry["data"] = tensor.json_data()
    else:
        entry["parameters"] = {"binary_data_size": binary_size}
    return entry


def decode_response(body: bytes, header_length: Optional[int]) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(the JSON header, {output name: array}) of an infer response; binary outputs are read from
    after the header in the order the header lists them. BYTES come back as object arrays of bytes,
    BF16 as float32 holding the exact values. Raises ValueError when the body does not add up."""
    cut = len(body) if header_length is None else header_length
    header = json.loads(body[:cut])
    blob, offset = memoryview(body)[cut:], 0
    arrays: Dict[str, np.ndarray] = {}
    for output in header.get("outputs", []):
        name, datatype, shape = output["name"], output["datatype"], output["shape"]
        size = (output.get("parameters") or {}).get("binary_data_size")
        try:
            if size is None:
                arrays[name] = _from_json(output["data"], datatype, shape)
            else:
                arrays[name] = _from_raw(bytes(blob[offset:offset + size]), datatype, shape)
                offset += size
        except (ValueError, KeyError, struct.error) as err:
            raise ValueError(f"output {name!r} ({datatype} {shape}) does not decode: {err}") from None
    if offset != len(blob):
        raise ValueError(f"response carries {len(blob)} bytes of binary data; its outputs account for {offset}")
    return header, arrays


def _from_raw(raw: bytes, datatype: str, shape: List[int]) -> np.ndarray:
    if datatype == "BYTES":
        items, offset = [], 0
        while offset < len(raw):
            (length,) = struct.unpack_from("<I", raw, offset)
            items.append(raw[offset + 4:offset + 4 + length])
            offset += 4 + length
        if offset != len(raw):
            raise ValueError("the last BYTES element runs past the data")
        return _object_array(items).reshape(shape)
    if datatype == "BF16":
        return _bf16_values(np.frombuffer(raw, dtype="<u2")).reshape(shape)
    wire = _NUMPY_OF[datatype].newbyteorder("<")
    return np.frombuffer(raw, dtype=wire).astype(_NUMPY_OF[datatype]).reshape(shape)


def _from_json(data: List[Any], datatype: str, shape: List[int]) -> np.ndarray:
    if datatype == "BYTES":
        flat = np.asarray(data, dtype=object).ravel().tolist()
        return _object_array([item.encode() if isinstance(item, str) else bytes(item) for item in flat]).reshape(shape)
    return np.asarray(data, dtype=np.float32 if datatype == "BF16" else _NUMPY_OF[datatype]).reshape(shape)


def _object_array(items: List[bytes]) -> np.ndarray:
    array = np.empty(len(items), dtype=object)  # np.array(items) would make a fixed-width bytes array
    array[:] = items
    return array


# -- answers and errors --------------------------------------------------------------------------


@dataclass(frozen=True)
class InferResult:
    """One infer answer: its outputs as numpy arrays, the JSON header as sent, and the HTTP headers."""

    outputs: Dict[str, np.ndarray]
    """{output name: array}, in the order the server sent them."""
    model_name: str
    """The model that answered."""
    model_version: Optional[str]
    """The version that answered (after alias and canary routing), as the body names it."""
    id: Optional[str]
    """The request id the server echoed, or None."""
    parameters: Dict[str, Any]
    """The response's own parameters ({} when it has none)."""
    headers: Dict[str, str]
    """The HTTP response headers, names lower-cased (e.g. "x-model-version")."""
    response: Dict[str, Any] = field(repr=False)
    """The JSON part of the body as parsed (with `data` only for outputs sent as JSON)."""

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.outputs:
            raise KeyError(f"no output {name!r}; the answer has {list(self.outputs)}")
        return self.outputs[name]


class InferenceError(RuntimeError):
    """The server answered a status other than 2xx (after any retries)."""

    def __init__(self, status: int, message: str, body: Any, *, url: str = "") -> None:
        super().__init__(f"{url} answered {status}: {message}" if url else f"answered {status}: {message}")
        self.status = status
        """The HTTP status."""
        self.message = message
        """The server's error message ({"error": ...}), or the body's text when it sent no JSON."""
        self.body = body
        """The body parsed as JSON, or its text where it is not JSON."""


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Dict[str, str]
    body: bytes
    stream: Optional[http.client.HTTPResponse] = None
    """A streamed 200 answer's body, still unread (then `body` is empty)."""

    def parsed(self) -> Any:
        return _json_or_text(self.body)


def _error_message(parsed: Any) -> str:
    """The server's message in an error body: {"error": message} (v2) or {"error": {"message": ...}} (OpenAI)."""
    if not isinstance(parsed, dict) or "error" not in parsed:
        return str(parsed)
    error = parsed["error"]
    return str(error.get("message", error)) if isinstance(error, dict) else str(error)


def _server_sent_data(response: http.client.HTTPResponse) -> Iterator[str]:
    """The data of each server-sent event of `response`, as it arrives (lines "data: ..." up to a blank line)."""
    data: List[str] = []
    while line := response.readline():
        text = line.decode().rstrip("\r\n")
        if text.startswith("data:"):
            data.append(text[5:].removeprefix(" "))
        elif not text and data:
            yield "\n".join(data)
            data = []
    if data:
        yield "\n".join(data)


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # e.g. the proxy's own plain-text errors
        return raw.decode(errors="replace")


def _retry_after_s(headers: Mapping[str, str]) -> Optional[float]:
    """Seconds a Retry-After header asks for (a number or an HTTP date), or None without a usable one."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Dropped(Exception):
    """The connection was refused, reset or closed before a whole answer came back."""


# -- the client ----------------------------------------------------------------------------------


class Client:
    """An Open Inference Protocol v2 REST client of `base_url` (e.g. "http://127.0.0.1:8000").

    Safe to share between threads: each thread keeps its own keep-alive connection. Every call has
    `timeout_s` in all, retries included; a 503 is retried up to `retries` times after waiting what
    its Retry-After says (or `backoff_s`, doubling, without one), and so is a refused, reset or
    dropped connection. A connection the server closed while idle is reopened at once, uncounted.
    """

    def __init__(
        self, base_url: str, *, api_key: Optional[str] = None, timeout_s: float = 30.0, retries: int = 3,
        binary: bool = True, backoff_s: float = 0.1,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"base_url={base_url!r}: expected http://host[:port][/prefix] or https://...")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s={timeout_s}: must be > 0")
        if retries < 0:
            raise ValueError(f"retries={retries}: must be >= 0")
        if backoff_s < 0:
            raise ValueError(f"backoff_s={backoff_s}: must be >= 0")
        self.base_url = base_url.rstrip("/")
        self.api_key, self.timeout_s, self.retries, self.binary, self.backoff_s = (
            api_key, timeout_s, retries, binary, backoff_s)
        self._scheme, self._netloc, self._prefix = parts.scheme, parts.netloc, parts.path.rstrip("/")
        self._local = threading.local()
        self._connections: List[_Connection] = []
        self._lock = threading.Lock()
        self._input_names: Dict[Tuple[str, Optional[str]], List[str]] = {}

    # -- the protocol's calls --

    def infer(
        self, model: str, inputs: Inputs, *, version: Union[str, int, None] = None,
        outputs: Optional[Sequence[str]] = None, request_id: Optional[str] = None, binary: Optional[bool] = None,
        datatypes: Optional[Mapping[str, str]] = None, parameters: Optional[Mapping[str, Any]] = None,
    ) -> InferResult:
        """Run `model` (at `version`, a number or alias; default: the server's routing) on `inputs`.

        `inputs` is {name: array}, or one array for a model with one input (its name is read from the
        model's metadata once). Each input's datatype follows its dtype unless `datatypes` names it
        (the array is then cast; "BF16" takes float or ml_dtypes arrays). `outputs` selects what
        comes back (default: all); `binary` overrides the client's choice of wire format for this
        call; `parameters` go into the request's own parameters. Raises ValueError for an input the
        protocol cannot carry, InferenceError for a non-2xx answer.
        """
        binary = self.binary if binary is None else binary
        named = inputs if isinstance(inputs, Mapping) else {self._only_input(model, version): inputs}
        tensors = [_tensor(name, value, (datatypes or {}).get(name)) for name, value in named.items()]
        if "binary_data_output" in (parameters or {}):
            raise ValueError("parameters['binary_data_output'] is the client's to set; pass binary= instead")
        body, header_length = _encode_request(tensors, binary=binary, outputs=outputs, request_id=request_id,
                                             parameters=parameters)
        headers = {"Content-Type": "application/octet-stream" if header_length is not None else "application/json"}
        if header_length is not None:
            headers["Inference-Header-Content-Length"] = str(header_length)
        answer = self._call("POST", f"{_model_path(model, version)}/infer", body, headers)
        length = answer.headers.get("inference-header-content-length")
        header, arrays = decode_response(answer.body, int(length) if length else None)
        return InferResult(
            outputs=arrays, model_name=header.get("model_name", model), model_version=header.get("model_version"),
            id=header.get("id"), parameters=header.get("parameters") or {}, headers=answer.headers, response=header,
        )

    # -- OpenAI-compatible completions (language models) --

    def complete(self, model: str, prompt: Union[str, Sequence[str]], **params: Any) -> Dict[str, Any]:
        """POST /v1/completions: `model` ("name", "name:7" or "name@alias") continuing `prompt` (a string,
        or a list of them), with OpenAI's completion parameters (max_tokens, temperature, top_p, top_k,
        stop, seed, n). The answer as OpenAI shapes it: {"choices": [{"text", "index", "finish_reason",
        ...}], "usage": {...}, ...}. A 429 (the model's queue is full) is retried as a 503 is. Raises
        InferenceError for any other non-2xx answer."""
        answer = self._call("POST", "/v1/completions", _completion_body(model, prompt, params),
                            {"Content-Type": "application/json"}, retry_busy=True)
        return answer.parsed()

    def stream_complete(self, model: str, prompt: Union[str, Sequence[str]], **params: Any) -> Iterator[str]:
        """The text of a completion as it is generated (stream=true): each delta as its server-sent event
        arrives (with n > 1 or several prompts, every choice's deltas in arrival order). Parameters, retries
        and errors as `complete`; once the answer has begun, each event may take up to `timeout_s`, and an
        error the server reports in the stream raises InferenceError. Stopping early closes the connection,
        which ends the generation on the server."""
        answer = self._call("POST", "/v1/completions", _completion_body(model, prompt, {**params, "stream": True}),
                            {"Content-Type": "application/json", "Accept": "text/event-stream"},
                            retry_busy=True, stream=True)
        connection = self._connection()
        response = answer.stream
        if response is None or connection.sock is None:
            raise InferenceError(answer.status, "the server answered without a stream", answer.parsed())
        connection.sock.settimeout(self.timeout_s)
        finished = False
        try:
            for data in _server_sent_data(response):
                if data == "[DONE]":
                    finished = True
                    return
                event = json.loads(data)
                if "error" in event:
                    raise InferenceError(answer.status, _error_message(event), event,
                                         url=f"POST {self.base_url}/v1/completions (in the stream)")
                yield from (choice["text"] for choice in event.get("choices", []) if choice.get("text"))
            raise ConnectionError(f"POST {self.base_url}/v1/completions: the stream ended before [DONE]")
        finally:
            if finished:
                response.read()  # the rest of the chunked body: the connection can serve the next call
            if not finished or response.will_close:
                connection.close()  # an unfinished answer must not be read as the next one's

    def server_metadata(self) -> Dict[str, Any]:
        """GET /v2: the server's name, version and extensions."""
        return self._call("GET", "/v2").parsed()

    def model_metadata(self, model: str, version: Union[str, int, None] = None) -> Dict[str, Any]:
        """GET /v2/models/{model}[/versions/{version}]: its versions, platform, inputs and outputs."""
        return self._call("GET", _model_path(model, version)).parsed()

    def models(self) -> List[Dict[str, Any]]:
        """GET /v2/models: what the server can serve, one entry per model ({"models": [...]} or a list)."""
        index = self._call("GET", "/v2/models").parsed()
        return index["models"] if isinstance(index, dict) else index

    def live(self) -> bool:
        """Whether GET /v2/health/live answers 200 (one try for the answer; connections are retried)."""
        return self._call("GET", "/v2/health/live", ok_only=False, retry_unavailable=False).status == 200

    def ready(self) -> bool:
        """Whether GET /v2/health/ready answers 200 (one try for the answer; connections are retried)."""
        return self._call("GET", "/v2/health/ready", ok_only=False, retry_unavailable=False).status == 200

    def model_ready(self, model: str, version: Union[str, int, None] = None) -> bool:
        """Whether GET /v2/models/{model}[/versions/{version}]/ready answers 200."""
        path = f"{_model_path(model, version)}/ready"
        return self._call("GET", path, ok_only=False, retry_unavailable=False).status == 200

    def close(self) -> None:
        """Close every thread's connection; a later call opens a new one."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            connection.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _only_input(self, model: str, version: Union[str, int, None]) -> str:
        key = (model, None if version is None else str(version))
        if key not in self._input_names:
            self._input_names[key] = [entry["name"] for entry in self.model_metadata(model, version)["inputs"]]
        names = self._input_names[key]
        if len(names) != 1:
            raise ValueError(f"model {model!r} takes inputs {names}; pass inputs as {{name: array}}")
        return names[0]

    # -- the exchange, with retries --

    def _call(
        self, method: str, path: str, body: Optional[bytes] = None, headers: Optional[Dict[str, str]] = None,
        *, ok_only: bool = True, retry_unavailable: bool = True, retry_busy: bool = False, stream: bool = False,
    ) -> _Answer:
        """The answer to one request, retried as the class says within `timeout_s` (`retry_busy`: a 429
        too). With `stream`, a 200 answer's body is left unread (`_Answer.stream`). Raises InferenceError
        for a non-2xx answer when `ok_only`, ConnectionError when no answer came."""
        url = f"{self.base_url}{path}"
        deadline = time.monotonic() + self.timeout_s
        for attempt in range(self.retries + 1):
            wait = self.backoff_s * 2 ** attempt
            try:
                answer = self._exchange(method, path, body, headers or {}, deadline, stream)
            except _Dropped as err:
                if attempt == self.retries or time.monotonic() + wait >= deadline:
                    raise ConnectionError(f"{method} {url}: no answer after {attempt + 1} tries: {err}") from err
                time.sleep(wait)
                continue
            retryable = (answer.status == 503 and retry_unavailable) or (answer.status == 429 and retry_busy)
            if retryable and attempt < self.retries:
                asked = _retry_after_s(answer.headers)
                wait = wait if asked is None else asked
                if time.monotonic() + wait < deadline:
                    time.sleep(wait)
                    continue
            break
        if ok_only and not 200 <= answer.status < 300:
            parsed = answer.parsed()
            raise InferenceError(answer.status, _error_message(parsed), parsed, url=f"{method} {url}")
        return answer

    def _exchange(
        self, method: str, path: str, body: Optional[bytes], headers: Dict[str, str], deadline: float,
        stream: bool = False,
    ) -> _Answer:
        """One request and its whole answer. Raises _Dropped when the connection fails, TimeoutError
        past `deadline`. A failure on a reused connection is tried once more on a fresh one: the
        server may have closed it while it sat idle."""
        connection = self._connection()
        auth = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        late = f"{method} {self.base_url}{path}: no answer within timeout_s={self.timeout_s}"
        while True:
            reused = connection.sock is not None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(late)
            try:
                return connection.exchange(method, f"{self._prefix}{path}", {**headers, **auth}, body, remaining,
                                           stream=stream)
            except TimeoutError:
                connection.close()  # an answer may still come: it must not be read as the next one's
                raise TimeoutError(late) from None
            except (ConnectionError, http.client.HTTPException) as err:
                connection.close()  # so the next try connects afresh
                if not reused:
                    raise _Dropped(f"{type(err).__name__}: {err}") from err

    def _connection(self) -> _Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = self._local.connection = _Connection(self._scheme, self._netloc)
            with self._lock:
                self._connections.append(connection)
        return connection


class _Connection:
    """One keep-alive HTTP/1.1 connection. A request leaves in a single send (http.client's own
    connection sends its head and body in two: a syscall and a TCP segment more per call, about a
    fifth of a small call's time on loopback); http.client reads the answer."""

    def __init__(self, scheme: str, netloc: str) -> None:
        parts = urlsplit(f"{scheme}://{netloc}")
        self._host, self._port = parts.hostname or "", parts.port or (443 if scheme == "https" else 80)
        self._netloc, self._tls = netloc, scheme == "https"
        self.sock: Optional[socket.socket] = None
        """The open socket, or None until the next exchange connects."""

    def exchange(
        self, method: str, target: str, headers: Dict[str, str], body: Optional[bytes], timeout_s: float,
        *, stream: bool = False,
    ) -> _Answer:
        """The answer to one request; with `stream`, a 200 answer's body is left for the caller to read."""
        if self.sock is None:
            self.sock = self._connect(timeout_s)
        self.sock.settimeout(timeout_s)
        head = [f"{method} {target} HTTP/1.1", f"Host: {self._netloc}", "Accept-Encoding: identity",
                *(f"{name}: {value}" for name, value in headers.items())]
        if body is not None:
            head.append(f"Content-Length: {len(body)}")
        self.sock.sendall("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + (body or b""))
        response = http.client.HTTPResponse(self.sock, method=method)
        try:
            response.begin()
            headers = {name.lower(): value for name, value in response.getheaders()}
            if stream and response.status == 200:
                return _Answer(response.status, headers, b"", response)
            data = response.read()
        except BaseException:
            response.close()
            raise
        response.close()  # its file only: the socket stays open for the next request
        if response.will_close:
            self.close()
        return _Answer(response.status, headers, data)

    def _connect(self, timeout_s: float) -> socket.socket:
        sock = socket.create_connection((self._host, self._port), timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each request is one write: send it at once
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self._host)
        return sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def _completion_body(model: str, prompt: Union[str, Sequence[str]], params: Mapping[str, Any]) -> bytes:
    return json.dumps({"model": model, "prompt": prompt if isinstance(prompt, str) else list(prompt),
                       **params}).encode()


def _model_path(model: str, version: Union[str, int, None]) -> str:
    path = f"/v2/models/{quote(model, safe='')}"
    return path if version is None else f"{path}/versions/{quote(str(version), safe='')}"


# -- the small calls jobs and deploys make -------------------------------------------------------


class Endpoint(Protocol):
    """Where a model answers: what `check_endpoint` needs (serve.deploy.DeployResult is one)."""

    @property
    def endpoint(self) -> str:
        """f"{base_url}/v2/models/{model}"."""
        ...

    @property
    def api_key(self) -> Optional[str]:
        """The key to send as `Authorization: Bearer`, or None without auth."""
        ...


def http_json(
    method: str, url: str, body: Optional[Dict[str, Any]] = None, *, api_key: Optional[str] = None,
    timeout_s: float = 30.0,
) -> Tuple[int, Any]:
    """(status, body parsed as JSON, or its text where it is not JSON) of one HTTP request, sent
    once (admin calls such as promote are not idempotent). Raises OSError when no answer came."""
    parts = urlsplit(url)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    data = None if body is None else json.dumps(body).encode()
    with Client(f"{parts.scheme}://{parts.netloc}", api_key=api_key, timeout_s=timeout_s, retries=0) as client:
        answer = client._call(method, path or "/", data, {"Content-Type": "application/json"},
                              ok_only=False, retry_unavailable=False)
    return answer.status, answer.parsed()


def wait_until_ready(base_url: str, timeout_s: float) -> None:
    """Poll `base_url`/v2/health/ready until it answers 200. Raises TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    # Each poll gets at most 10 s, so that one hung poll cannot hold the loop far past its deadline.
    with Client(base_url, timeout_s=max(0.1, min(10.0, timeout_s)), retries=0) as client:
        while True:
            try:
                if client.ready():
                    return
            except OSError:  # the proxy may not listen yet
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url}/v2/health/ready did not answer 200 within {timeout_s} s")
            time.sleep(0.25)


def check_endpoint(deployment: Endpoint, features: np.ndarray, input_name: str = "input") -> Dict[str, Any]:
    """POST `features` (one row per sample) as input `input_name` to the deployment's infer route with its
    key, in JSON: FP32 rows, or one BYTES string per row when `features` is an array of str or bytes (a text
    classifier). The parsed v2 response body. Raises RuntimeError (InferenceError) when the endpoint answers
    anything but 2xx."""
    rows: np.ndarray
    if np.asarray(features).dtype.kind in "OSU":
        rows = np.asarray(features, dtype=object).reshape(len(features))
    else:
        rows = np.asarray(features, dtype=np.float32).reshape(len(features), -1)
    base_url, model = deployment.endpoint.rsplit("/v2/models/", 1)
    with Client(base_url, api_key=deployment.api_key, binary=False) as client:
        return client.infer(model, {input_name: rows}, request_id="check_endpoint").response
