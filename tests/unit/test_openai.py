"""serve.openai without Ray or HTTP: completion bodies parsed and refused, the length budget, the answers'
shapes, merging sequence streams, and the rollback policy's time-to-first-token limit for language models."""

import asyncio
import json
from typing import Any, AsyncIterator, Dict, List, Tuple

import pytest

from orchestrator.config import RolloutConfig
from orchestrator.config.schema import GenerationConfig
from serve.generation import TokenEvent
from serve.openai import (
    Choice,
    CompletionRequest,
    OpenAIError,
    Timing,
    collect,
    completion_body,
    completion_budget,
    error_body,
    merged,
    model_list,
    model_reference,
    parse_completion_request,
    stream_event,
    usage_event,
)
from serve.protocol import BadRequest
from serve.rollout import Decision, RollbackPolicy


def parse(**body) -> CompletionRequest:
    return parse_completion_request(json.dumps(body).encode())


def refused(raw: bytes) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        parse_completion_request(raw)
    assert caught.value.status == 400
    return caught.value


def test_defaults_and_the_seed_of_each_completion():
    request = parse(model="lm", prompt="hi", seed=7, n=3, stop="\n", user="me", logprobs=None, echo=False,
                    presence_penalty=0, stream_options={"include_usage": True})
    assert request.prompts == ("hi",) and request.max_tokens is None and request.stream is False
    assert (request.temperature, request.top_p, request.top_k, request.stop) == (1.0, 1.0, 0, ("\n",))
    assert [request.sampling(i, 5).seed for i in range(3)] == [7, 8, 9]
    assert request.sampling(0, 5).max_tokens == 5 and request.sequences == 3
    assert parse(model="lm", prompt="a", top_k=-1).top_k == 0  # vLLM's "off"
    assert parse(model="lm", prompt="a", seed=2**63 - 1, n=2).sampling(1, 1).seed == 0  # wraps, never negative


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a"}, "model"),
    ({"model": "lm"}, "prompt"),
    ({"model": "lm", "prompt": ["a", ""]}, "prompt"),
    ({"model": "lm", "prompt": [[1, 2]]}, "prompt"),
    ({"model": "lm", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ({"model": "lm", "prompt": "a", "max_tokens": 2.0}, "max_tokens"),
    ({"model": "lm", "prompt": "a", "temperature": True}, "temperature"),
    ({"model": "lm", "prompt": "a", "top_p": 1.5}, "top_p"),
    ({"model": "lm", "prompt": "a", "n": 129}, "n"),
    ({"model": "lm", "prompt": "a", "best_of": 3}, "best_of"),
    ({"model": "lm", "prompt": "a", "stop": ["a"] * 5}, "stop"),
    ({"model": "lm", "prompt": "a", "echo": True}, "echo"),
    ({"model": "lm", "prompt": "a", "presence_penalty": False}, "presence_penalty"),  # not the number 0
    ({"model": "lm", "prompt": "a", "stream_options": {"include_usage": 1}}, "stream_options"),
    ({"model": "lm", "prompt": "a", "frobnicate": 1}, "frobnicate"),
])
def test_each_mistake_names_its_field(body, param):
    assert refused(json.dumps(body).encode()).param == param


def test_bodies_that_are_not_json_objects():
    for raw in (b"", b"{", b"[]", b'"text"', b"\xff\xfe"):
        assert refused(raw).param is None


def test_model_references():
    assert model_reference("lm") == ("lm", None)
    assert model_reference("lm:3") == ("lm", "3")
    assert model_reference("lm@candidate") == ("lm", "candidate")
    assert model_reference("models:/lm/2") == ("lm", "2")
    for bad in ("", "a b", "lm:x:y"):
        with pytest.raises(OpenAIError) as caught:
            model_reference(bad)
        assert caught.value.status == 404 and caught.value.param == "model"


def test_the_budget_of_a_request():
    cfg = GenerationConfig(default_max_tokens=16)
    assert completion_budget(parse(model="lm", prompt="a"), [10], context=64, cfg=cfg) == 16
    assert completion_budget(parse(model="lm", prompt="a"), [60], context=64, cfg=cfg) == 4  # the context ends
    assert completion_budget(parse(model="lm", prompt="a", max_tokens=54), [10], context=64, cfg=cfg) == 54
    for request, lengths, limits, words in (
        (parse(model="lm", prompt="a"), [64], cfg, "no token is left"),
        (parse(model="lm", prompt="a"), [65], cfg, "prompt 0 is 65 tokens long"),
        (parse(model="lm", prompt="a"), [3, 9], GenerationConfig(max_prompt_tokens=8), "prompt 1 is 9 tokens"),
        (parse(model="lm", prompt="a", max_tokens=55), [10], cfg, "asks for 65 (10 in the prompt, 55 in"),
        (parse(model="lm", prompt="a", max_tokens=9), [1], GenerationConfig(max_tokens_limit=8), "allows (8)"),
    ):
        with pytest.raises(OpenAIError) as caught:
            completion_budget(request, lengths, context=64, cfg=limits)
        assert caught.value.status == 400 and words in caught.value.message, caught.value.message


def test_answers_and_error_bodies_are_openais():
    body = json.loads(completion_body(id="cmpl-1", created=5, model="lm", prompt_tokens=3, choices=[
        Choice(index=1, text="b", finish_reason="stop", tokens=2), Choice(index=0, text="a", finish_reason="length",
                                                                          tokens=4)]))
    assert body == {"id": "cmpl-1", "object": "text_completion", "created": 5, "model": "lm",
                    "choices": [{"text": "a", "index": 0, "logprobs": None, "finish_reason": "length"},
                                {"text": "b", "index": 1, "logprobs": None, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}}
    chunk = stream_event(id="cmpl-1", created=5, model="lm", index=2, text="x", finish_reason=None)
    assert chunk.startswith(b"data: {") and chunk.endswith(b"}\n\n")
    assert json.loads(chunk[6:])["choices"] == [{"text": "x", "index": 2, "logprobs": None, "finish_reason": None}]
    usage = json.loads(usage_event(id="cmpl-1", created=5, model="lm", prompt_tokens=1, completion_tokens=2)[6:])
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 3
    assert error_body(BadRequest(401, "no key")) == {
        "error": {"message": "no key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
    assert error_body(OpenAIError(400, "bad", param="n"))["error"]["param"] == "n"
    assert error_body(BadRequest(500, "boom"))["error"]["type"] == "server_error"
    index: List[Dict[str, Any]] = [{"name": "lm", "task": "causal_lm", "created": 9},
                                   {"name": "digits", "task": "classification"}]
    assert model_list(index) == {"object": "list", "data": [{"id": "lm", "object": "model", "created": 9,
                                                             "owned_by": "orchestrator"}]}


class Events:
    """An engine-like stream of `texts`, one event each (the last one finished), that records its closing."""

    def __init__(self, texts: List[str], delay_s: float = 0.0):
        self.texts, self.delay_s, self.closed = list(texts), delay_s, False

    def __aiter__(self) -> "Events":
        return self

    async def __anext__(self) -> TokenEvent:
        if not self.texts or self.closed:
            raise StopAsyncIteration
        await asyncio.sleep(self.delay_s)
        text = self.texts.pop(0)
        return TokenEvent(text, (1,) * len(text), None if self.texts else "length")

    async def aclose(self) -> None:
        self.closed = True


def test_merged_streams_keep_each_sequences_order_and_close_them_all():
    async def run() -> Tuple[list, List[Events]]:
        streams = [Events(["a", "b", "c"], 0.003), Events(["x", "yz"], 0.001)]
        choices = await collect(merged(list(enumerate(streams))), _timing())
        return choices, streams

    choices, streams = asyncio.run(run())
    assert sorted((c.index, c.text, c.tokens) for c in choices) == [(0, "abc", 3), (1, "xyz", 3)]
    assert all(s.closed for s in streams)

    async def abandoned() -> List[Events]:
        streams = [Events(["a"] * 100, 0.001), Events(["b"] * 100, 0.001)]
        events: AsyncIterator = merged(list(enumerate(streams)))
        await events.__anext__()
        await events.aclose()  # type: ignore[attr-defined]  # the consumer went away
        return streams

    assert all(s.closed for s in asyncio.run(abandoned())), "a closed merge closes every stream (frees slots)"


def _timing() -> Timing:
    return Timing(0.0, on_first=lambda ms: None, on_tokens=lambda tokens, gap: None)


def test_a_language_model_candidate_is_judged_on_time_to_first_token():
    policy = RollbackPolicy(RolloutConfig(min_requests=2, max_p99_ms=10_000, max_p99_ttft_ms=100))
    slow_first_tokens = [(True, 500.0)] * 4
    assert policy.decide(slow_first_tokens).decision is Decision.KEEP  # a classifier's limit
    verdict = policy.decide(slow_first_tokens, generator=True)
    assert verdict.decision is Decision.ROLLBACK and "time to first token 500.0 ms" in verdict.reason
    assert policy.decide([(True, 50.0)] * 4, generator=True).decision is Decision.KEEP
