"""The OpenAI-compatible completions API: request bodies of POST /v1/completions parsed and checked, the
answers (whole, or as server-sent events), GET /v1/models, and every error in OpenAI's error body.

Pure: no Ray, no HTTP. Every way a client can get a request wrong is an `OpenAIError` (a `BadRequest`)
with a 4xx status, the parameter at fault and a message naming it, so the ingress never answers a
client mistake with a 5xx. Parsed with orjson and checked by hand, as serve/protocol.py does.

Model names as requests give them: `name` (the routed version, canary split included), `name:7` (a
version number), `name@candidate` (an alias), or any other form `orchestrator.registry.parse_ref` reads.
"""

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

import orjson

from orchestrator.config.schema import GenerationConfig
from orchestrator.registry.refs import parse_ref
from serve.generation import EngineFull, GenerationEngine, SamplingParams, TokenEvent
from serve.protocol import BadRequest

T = TypeVar("T")

MAX_STOP = 4
"""Stop sequences one request may give (OpenAI's limit)."""
MAX_N = 128
"""Completions per prompt one request may ask for (OpenAI's limit)."""
LANGUAGE_MODEL_TASK = "causal_lm"
"""The signature task of the registry versions these routes serve."""
DONE = b"data: [DONE]\n\n"
"""The last server-sent event of every stream, as OpenAI sends it."""


def _is_zero(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0)


def _is_stream_options(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and set(value) <= {"include_usage"}
                             and isinstance(value.get("include_usage", True), bool))


_TOLERATED: Dict[str, Tuple[Callable[[Any], bool], str]] = {
    "user": (lambda v: isinstance(v, str), "a string"),
    "logprobs": (lambda v: v is None, "null"),
    "echo": (lambda v: v is None or v is False, "false"),
    "suffix": (lambda v: v is None, "null"),
    "presence_penalty": (_is_zero, "0"),
    "frequency_penalty": (_is_zero, "0"),
    "logit_bias": (lambda v: v is None or v == {}, "{}"),
    "stream_options": (_is_stream_options, 'null or {"include_usage": <bool>} (usage is always sent last)'),
}
"""Fields OpenAI clients send that this server accepts at their neutral values only: (check, what passes)."""
_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "n", "stream", "best_of")
_CODES = {401: "invalid_api_key", 403: "insufficient_permissions", 404: "model_not_found", 413: "request_too_large",
          429: "rate_limit_exceeded"}


class OpenAIError(BadRequest):
    """An error answered in OpenAI's body: `param` names the request field at fault (or None), `code`
    is OpenAI's short code (or None for the status's default)."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None):
        super().__init__(status, message, headers=headers)
        self.param = param
        self.code = code


def error_body(err: BadRequest) -> Dict[str, Any]:
    """OpenAI's error body for `err` (any BadRequest: auth, limits and routing errors too)."""
    param = err.param if isinstance(err, OpenAIError) else None
    code = err.code if isinstance(err, OpenAIError) and err.code else _CODES.get(err.status)
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return {"error": {"message": err.message, "type": kind, "param": param, "code": code}}


def server_error(err: Exception) -> Dict[str, Any]:
    """OpenAI's error body for a fault of the server or model (a 500)."""
    return error_body(BadRequest(500, f"internal error: {type(err).__name__}: {err}"))


# -- requests ------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class CompletionRequest:
    """A checked POST /v1/completions body."""

    model: str
    """The model as the request names it (`name`, `name:7`, `name@alias`)."""
    prompts: Tuple[str, ...]
    """The prompts, each non-empty."""
    max_tokens: Optional[int]
    """Tokens to generate per completion; None for the server's default."""
    temperature: float
    """0 is greedy."""
    top_p: float
    """Nucleus sampling mass in (0, 1]; 1 is off."""
    top_k: int
    """Sample from the k most likely tokens; 0 is off."""
    stop: Tuple[str, ...]
    """Up to MAX_STOP non-empty stop sequences."""
    seed: Optional[int]
    """Seed of the first completion of each prompt; the i-th completion of a prompt uses seed + i."""
    n: int
    """Completions per prompt."""
    stream: bool
    """Answer as server-sent events."""

    @property
    def sequences(self) -> int:
        """Sequences the request generates: n per prompt."""
        return self.n * len(self.prompts)

    def sampling(self, index: int, max_tokens: int) -> SamplingParams:
        """The sampling parameters of completion `index` (0 .. n-1) of a prompt."""
        seed = None if self.seed is None else (self.seed + index) % 2**63
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, stop=self.stop, seed=seed)


def parse_completion_request(raw: bytes) -> CompletionRequest:
    """The CompletionRequest of a body. Raises OpenAIError (400) naming the field at fault."""
    body = _json_object(raw)
    unknown = sorted(set(body) - set(_FIELDS) - set(_TOLERATED))
    if unknown:
        raise OpenAIError(400, f"Unrecognized request argument supplied: {', '.join(unknown)}", param=unknown[0])
    _check_tolerated(body)
    n = _integer(body, "n", 1, low=1, high=MAX_N)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:
        raise OpenAIError(400, f"best_of={best_of!r}: only best_of equal to n ({n}) is supported", param="best_of")
    return CompletionRequest(
        model=_model(body), prompts=_prompts(body), max_tokens=_optional_integer(body, "max_tokens", low=1),
        temperature=_number(body, "temperature", 1.0, low=0.0, high=2.0),
        top_p=_number(body, "top_p", 1.0, low=0.0, high=1.0, low_open=True),
        top_k=max(0, _integer(body, "top_k", 0, low=-1)),  # -1 (vLLM's "off") is 0 here
        stop=_stop(body), seed=_optional_integer(body, "seed", low=-(2**63), high=2**63 - 1), n=n,
        stream=_boolean(body, "stream", False),
    )


def parse_model_field(raw: bytes) -> str:
    """The `model` of a body whose other fields this server does not read (/v1/chat/completions)."""
    return _model(_json_object(raw))


def model_reference(model: str) -> Tuple[str, Optional[str]]:
    """(name, version number or alias, or None for the routed version) of a request's `model`.
    Raises OpenAIError 404 for a name no registry model can have."""
    try:
        parsed = parse_ref(model)
    except ValueError as err:
        raise OpenAIError(404, f"The model {model!r} does not exist: {err}", param="model") from None
    if parsed.model is None:  # a bare word: a model name, routed
        return _checked_name(model), None
    return parsed.model, parsed.selector


def check_language_model(model: str, version: int, signature: Dict[str, Any]) -> None:
    """Raise OpenAIError 400 unless the version is a language model (these routes generate text)."""
    task = signature.get("task", "classification")
    if task != LANGUAGE_MODEL_TASK:
        raise OpenAIError(400, f"model {model!r} (version {version}) is a {task} model, not a language model: "
                               "send it Open Inference Protocol requests at /v2/models/{name}/infer", param="model")


def chat_refusal(model: str, signature: Dict[str, Any]) -> OpenAIError:
    """Why /v1/chat/completions cannot answer for this version (chat templates are not applied yet)."""
    if not signature.get("chat_template"):
        return OpenAIError(400, f"model {model!r} has no chat template: send its prompt as text to /v1/completions",
                           param="model")
    return OpenAIError(400, f"model {model!r} has a chat template, but this server does not apply chat templates "
                            "yet: send the formatted prompt to /v1/completions", param="messages")


def completion_budget(request: CompletionRequest, prompt_lengths: Sequence[int], *, context: int,
                      cfg: GenerationConfig) -> int:
    """The max_tokens every sequence of `request` runs with, its prompts being `prompt_lengths` tokens
    long (BOS included). Without max_tokens: cfg.default_max_tokens, or less where the context ends sooner.
    Raises OpenAIError (400) naming the lengths when a prompt or the completion does not fit."""
    longest = max(prompt_lengths)
    prompt_limit = min(cfg.max_prompt_tokens or context, context)
    if longest > prompt_limit:
        index = list(prompt_lengths).index(longest)
        raise OpenAIError(400, f"prompt {index} is {longest} tokens long; this server takes prompts of at most "
                               f"{prompt_limit} tokens", param="prompt", code="context_length_exceeded")
    if request.max_tokens is None:
        budget = min(cfg.default_max_tokens, context - longest)
        if budget < 1:
            raise OpenAIError(400, f"This model's maximum context length is {context} tokens, and the prompt "
                                   f"takes {longest}: no token is left to generate", param="prompt",
                              code="context_length_exceeded")
        return budget
    limit = cfg.max_tokens_limit or context
    if request.max_tokens > limit:
        raise OpenAIError(400, f"max_tokens={request.max_tokens} is more than this server allows ({limit})",
                          param="max_tokens")
    if longest + request.max_tokens > context:
        raise OpenAIError(400, f"This model's maximum context length is {context} tokens; the request asks for "
                               f"{longest + request.max_tokens} ({longest} in the prompt, {request.max_tokens} in "
                               "the completion)", param="max_tokens", code="context_length_exceeded")
    return request.max_tokens


def _json_object(raw: bytes) -> Dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise OpenAIError(400, f"the request body is not valid JSON: {err}") from None
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, not {_kind(body)}")
    return body


def _model(body: Dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise OpenAIError(400, f"'model' must be a non-empty string naming a model, got {_kind(model)}", param="model")
    return model


def _checked_name(name: str) -> str:
    # parse_ref checked names given with a version; a bare word is checked here the same way.
    try:
        return parse_ref(f"{name}@latest").model or name
    except ValueError:
        raise OpenAIError(404, f"The model {name!r} does not exist", param="model") from None


def _prompts(body: Dict[str, Any]) -> Tuple[str, ...]:
    if "prompt" not in body:
        raise OpenAIError(400, "'prompt' is required: a string or a list of strings", param="prompt")
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts:
        raise OpenAIError(400, f"'prompt' must be a string or a non-empty list of strings, got {_kind(prompt)}",
                          param="prompt")
    for i, text in enumerate(prompts):
        if not isinstance(text, str):
            noun = "token ids are not supported: send text" if isinstance(text, (int, list)) else "must be a string"
            raise OpenAIError(400, f"'prompt' item {i} {noun}, got {_kind(text)}", param="prompt")
        if not text:
            raise OpenAIError(400, f"'prompt' item {i} is empty: give the model some text to continue", param="prompt")
    return tuple(prompts)


def _stop(body: Dict[str, Any]) -> Tuple[str, ...]:
    stop = body.get("stop")
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise OpenAIError(400, f"'stop' must be a non-empty string or a list of them, got {_kind(stop)}", param="stop")
    if len(stops) > MAX_STOP:
        raise OpenAIError(400, f"'stop' holds {len(stops)} sequences; at most {MAX_STOP} are allowed", param="stop")
    return tuple(stops)


def _check_tolerated(body: Dict[str, Any]) -> None:
    for name, (allowed, wanted) in _TOLERATED.items():
        if name in body and not allowed(body[name]):
            raise OpenAIError(400, f"'{name}'={_short(body[name])} is not supported here (allowed: {wanted})",
                              param=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: Dict[str, Any], name: str, default: int, *, low: int, high: Optional[int] = None) -> int:
    value = _optional_integer(body, name, low=low, high=high)
    return default if value is None else value


def _optional_integer(body: Dict[str, Any], name: str, *, low: int, high: Optional[int] = None) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise OpenAIError(400, f"'{name}' must be an integer, got {_kind(value)}", param=name)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise OpenAIError(400, f"'{name}' must be {bounds}, got {value}", param=name)
    return value


def _number(body: Dict[str, Any], name: str, default: float, *, low: float, high: float,
            low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise OpenAIError(400, f"'{name}' must be a number, got {_kind(value)}", param=name)
    if not (low < value if low_open else low <= value) or value > high:
        raise OpenAIError(400, f"'{name}' must be in {'(' if low_open else '['}{low}, {high}], got {value}", param=name)
    return float(value)


def _boolean(body: Dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise OpenAIError(400, f"'{name}' must be true or false, got {_kind(value)}", param=name)
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {_short(value)}"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


# -- answers -------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Choice:
    """One finished completion."""

    index: int
    """prompt index * n + completion index (OpenAI's order)."""
    text: str
    finish_reason: str
    """'stop' or 'length'."""
    tokens: int
    """Tokens generated."""


def completion_id() -> str:
    """A fresh completion id, as OpenAI writes them."""
    return f"cmpl-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int) -> Dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(*, id: str, created: int, model: str, choices: Iterable[Choice], prompt_tokens: int) -> bytes:
    """The JSON answer of a whole (not streamed) completion request."""
    ordered = sorted(choices, key=lambda c: c.index)
    return orjson.dumps({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"text": c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish_reason}
                    for c in ordered],
        "usage": usage(prompt_tokens, sum(c.tokens for c in ordered)),
    })


def stream_event(*, id: str, created: int, model: str, index: int, text: str, finish_reason: Optional[str]) -> bytes:
    """One server-sent event of a stream: a text delta of choice `index` (the last one names why it ended)."""
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model,
             "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}]}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def usage_event(*, id: str, created: int, model: str, prompt_tokens: int, completion_tokens: int) -> bytes:
    """The stream's last chunk before [DONE]: no choices, the usage of the whole request."""
    chunk = {"id": id, "object": "text_completion", "created": created, "model": model, "choices": [],
             "usage": usage(prompt_tokens, completion_tokens)}
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def model_list(models: Iterable[Dict[str, Any]]) -> Dict[str, Any]:
    """GET /v1/models from the controller's index: every language model, by name."""
    return {"object": "list", "data": [
        {"id": m["name"], "object": "model", "created": int(m.get("created", 0)), "owned_by": "orchestrator"}
        for m in models if m.get("task") == LANGUAGE_MODEL_TASK
    ]}


def now() -> int:
    """`created` of an answer: Unix seconds."""
    return int(time.time())



# -- running a request on a generation engine ------------------------------------------------------

Streams = List[Tuple[int, AsyncIterator[TokenEvent]]]
"""(choice index, the engine's event stream) of each sequence of one request."""


async def start_sequences(engine: GenerationEngine, request: CompletionRequest, cfg: GenerationConfig, *,
                          retry_after_s: int) -> Tuple[Streams, int]:
    """Queue every sequence of `request` (n per prompt) on `engine`: their streams, and the prompt tokens
    (each prompt counted once, BOS included). All or none: a refusal closes the streams already started.

    Raises OpenAIError: 400 for prompts or completions that do not fit the model or the limits, 429 with
    Retry-After when the engine's waiting queue is full.
    """
    capacity = cfg.max_running_sequences + cfg.max_waiting_sequences
    if request.sequences > capacity:
        raise OpenAIError(400, f"the request asks for {request.sequences} sequences (n={request.n} for each of "
                               f"{len(request.prompts)} prompts); a replica holds at most {capacity}", param="n")
    prompts = [engine.encode_prompt(p) for p in request.prompts]
    max_tokens = completion_budget(request, [len(p) for p in prompts], context=engine.context, cfg=cfg)
    streams: Streams = []
    try:
        for p, prompt in enumerate(prompts):
            for i in range(request.n):
                streams.append((p * request.n + i, engine.generate(prompt, request.sampling(i, max_tokens))))
    except (EngineFull, ValueError) as err:
        for _, stream in streams:
            await close(stream)
        if isinstance(err, ValueError):
            raise OpenAIError(400, str(err), param="max_tokens") from None
        raise OpenAIError(429, f"the model is busy: {err}; retry in {retry_after_s} s",
                          headers={"Retry-After": str(retry_after_s)}) from None
    return streams, sum(len(p) for p in prompts)


async def merged(streams: Streams) -> AsyncIterator[Tuple[int, TokenEvent]]:
    """The events of every stream as they come, each with its choice index. Closing this iterator (or
    cancelling its consumer) closes every stream, which frees their engine slots."""
    if len(streams) == 1:  # the common case, without a task per token
        (index, stream), = streams
        try:
            async for event in stream:
                yield index, event
        finally:
            await close(stream)
        return
    pending = {asyncio.ensure_future(anext(stream)): (index, stream) for index, stream in streams}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                index, stream = pending.pop(task)
                event = task.result()
                if event.finish_reason is None:
                    pending[asyncio.ensure_future(anext(stream))] = (index, stream)
                yield index, event
    finally:
        for task in pending:
            task.cancel()
        for _, stream in streams:
            await close(stream)


async def close(stream: AsyncIterator[Any]) -> None:
    """Close an event stream: the engine's (its slot frees before the next step) or `merged`'s."""
    aclose = getattr(stream, "aclose", None)  # both have one; the engine's annotation says AsyncIterator only
    if aclose is not None:
        await aclose()


class Timing:
    """Token times of one request's sequences: each sequence's time to first token goes to `on_first(ms)`,
    every event's tokens to `on_tokens(tokens, gap_ms)` (gap_ms None for a sequence's first event);
    `first_token_ms` is the request's first token."""

    def __init__(self, started: float, on_first: Callable[[float], None],
                 on_tokens: Callable[[int, Optional[float]], None]):
        self._started, self._on_first, self._on_tokens = started, on_first, on_tokens
        self._last: Dict[int, float] = {}
        self.first_token_ms: Optional[float] = None

    def saw(self, index: int, event: TokenEvent) -> None:
        now = time.perf_counter()
        if index not in self._last:
            ms = (now - self._started) * 1000
            self.first_token_ms = ms if self.first_token_ms is None else self.first_token_ms
            self._on_first(ms)
            self._on_tokens(len(event.token_ids), None)
        else:
            self._on_tokens(len(event.token_ids), (now - self._last[index]) * 1000)
        self._last[index] = now


async def collect(events: AsyncIterator[Tuple[int, TokenEvent]], timing: Timing) -> List[Choice]:
    """Every sequence's whole completion."""
    texts: Dict[int, List[str]] = {}
    tokens: Dict[int, int] = {}
    choices: List[Choice] = []
    async for index, event in events:
        timing.saw(index, event)
        texts.setdefault(index, []).append(event.text)
        tokens[index] = tokens.get(index, 0) + len(event.token_ids)
        if event.finish_reason is not None:
            choices.append(Choice(index=index, text="".join(texts[index]), finish_reason=event.finish_reason,
                                  tokens=tokens[index]))
    return choices


async def server_sent_events(events: AsyncIterator[Tuple[int, TokenEvent]], timing: Timing, *, id: str,
                             created: int, model: str, prompt_tokens: int,
                             on_end: Callable[[int], None]) -> AsyncIterator[bytes]:
    """A streamed answer: a chunk per text delta, the usage chunk, then [DONE]. `on_end(status)` when it
    ends: 200 when whole, 499 when the client went away, 500 when generation failed (an error event is
    the last one then)."""
    status, completion_tokens = 499, 0
    try:
        async for index, event in events:
            timing.saw(index, event)
            completion_tokens += len(event.token_ids)
            if event.text or event.finish_reason is not None:
                yield stream_event(id=id, created=created, model=model, index=index, text=event.text,
                                   finish_reason=event.finish_reason)
        yield usage_event(id=id, created=created, model=model, prompt_tokens=prompt_tokens,
                          completion_tokens=completion_tokens)
        yield DONE
        status = 200
    except Exception as err:  # the model failed after the answer began: the client learns it from the stream
        status = 500
        yield b"data: " + orjson.dumps(server_error(err)) + b"\n\n"
    finally:
        await close(events)
        on_end(status)


class ClientGone(Exception):
    """The client disconnected while its answer was being made."""


async def unless_disconnected(work: Awaitable[T], is_disconnected: Callable[[], Awaitable[bool]],
                              poll_s: float = 0.1) -> T:
    """`work`'s result; cancels it and raises ClientGone as soon as `is_disconnected()` says so."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                raise ClientGone()
    finally:
        if not task.done():
            task.cancel()
