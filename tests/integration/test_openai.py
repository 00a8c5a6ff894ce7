"""OpenAI-compatible completions on a real Serve app: a tiny GPT trained in-process on a repetitive text
(so greedy output means something), registered with its byte tokenizer beside a digits classifier,
served on demand by the same replicas and spoken to over HTTP: raw requests, orchestrator.client and
OpenAI's own Python client."""

import http.client
import json
import time
import urllib.request
from types import SimpleNamespace
from typing import Any, Dict, List, Tuple

import numpy as np
import openai
import pytest
import ray
import requests
import torch
from ray import serve

from orchestrator.client import Client, InferenceError
from orchestrator.config import (
    BuiltinModel,
    DataConfig,
    DataKind,
    MetricMode,
    ModelConfig,
    PipelineConfig,
    RolloutConfig,
    ServeConfig,
    StorageConfig,
    TaskConfig,
    TaskKind,
    TuneConfig,
    to_dict,
)
from orchestrator.config.schema import GenerationConfig
from orchestrator.registry import ModelRegistry
from orchestrator.training.gpt import GPT
from orchestrator.training.models import build_model
from orchestrator.training.tasks import get_task
from orchestrator.training.text import BOS_ID, ByteTokenizer
from serve.deploy import run_deploy
from serve.generation import full_recompute_greedy
from serve.names import INGRESS_DEPLOYMENT
from tests.integration.serving_support import INPUT_SHAPE, register
from tests.support import free_port, wait_for

LM = "tiny_lm"
CLASSIFIER = "digits"
TEXT = "the quick brown fox jumps over the lazy dog. "
TRAIN_LENGTH = 64
CONTEXT = 2048
"""Far more positions than it trains on: a long generation lasts seconds, so a disconnect can cut it short."""
RUNNING, WAITING = 4, 4
MIN_REQUESTS = 5
APP = ServeConfig().app_name


def train_lm(cfg: PipelineConfig, steps: int) -> GPT:
    """The GPT of `cfg` trained on BOS + windows of TEXT repeated, from any offset: greedy continues the cycle."""
    tokens = ByteTokenizer().encode(TEXT * (TRAIN_LENGTH // len(TEXT) + 2))
    torch.manual_seed(0)
    model = build_model(cfg.model, [TRAIN_LENGTH], ByteTokenizer().vocab_size)
    assert isinstance(model, GPT)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            offsets = torch.randint(0, len(TEXT), (16,)).tolist()
            batch = torch.tensor([[BOS_ID, *tokens[o:o + TRAIN_LENGTH]] for o in offsets])
            logits = model(batch[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def register_lm(root: str, cfg: PipelineConfig, model: torch.nn.Module, alias: str = "") -> int:
    registry = ModelRegistry(root)
    info = SimpleNamespace(vocab_size=ByteTokenizer().vocab_size, context=TRAIN_LENGTH, tokenizer="bytes")
    version = registry.register(
        LM, {k: v.detach().numpy() for k, v in model.state_dict().items()}, metrics={}, config=to_dict(cfg),
        lineage={"source": "openai tests"}, signature=get_task("causal_lm").signature(info),
        files={"tokenizer.json": ByteTokenizer().spec},
    )
    if alias:
        registry.set_alias(LM, alias, version.version)
    return version.version


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    """digits v1 (the deployed classifier); tiny_lm v1 ('production', trained) and v2 ('candidate', trained less)."""
    root = str(tmp_path_factory.mktemp("openai"))
    serve_cfg = ServeConfig(
        port=free_port(), min_replicas=1, max_replicas=1,
        generation=GenerationConfig(max_running_sequences=RUNNING, max_waiting_sequences=WAITING),
        # A language-model candidate is judged on time to first token: no first token is ever this fast.
        rollout=RolloutConfig(min_requests=MIN_REQUESTS, max_p99_ttft_ms=0.001, sync_interval_s=0.25),
    )
    cfg = PipelineConfig(model=ModelConfig(hidden=[16]), storage=StorageConfig(root=root), serve=serve_cfg)
    register(cfg, build_model(cfg.model, INPUT_SHAPE, 10), alias="production")
    lm_cfg = PipelineConfig(
        task=TaskConfig(name=TaskKind.causal_lm), data=DataConfig(kind=DataKind.text, context=TRAIN_LENGTH),
        model=ModelConfig(name=BuiltinModel.gpt, layers=2, heads=2, width=64, context=CONTEXT),
        tune=TuneConfig(metric="val_loss", mode=MetricMode.min), storage=cfg.storage,
    )
    models = [train_lm(lm_cfg, 300), train_lm(lm_cfg, 20)]
    register_lm(cfg.storage.root, lm_cfg, models[0], alias="production")  # what unversioned requests reach
    register_lm(cfg.storage.root, lm_cfg, models[1], alias="candidate")
    deployed = run_deploy(cfg)
    yield SimpleNamespace(deployed=deployed, models=models, url=f"{deployed.base_url}/v1",
                          headers={"Authorization": f"Bearer {deployed.api_key}"})
    serve.shutdown()


def expected(model: GPT, prompt: str, max_tokens: int) -> Tuple[str, List[int]]:
    """Greedy text after `prompt` in-process (the whole model re-run per token): (text, token ids)."""
    tokenizer = ByteTokenizer()
    ids = full_recompute_greedy(model, [BOS_ID, *tokenizer.encode(prompt)], max_tokens)
    return tokenizer.decode(ids).decode(), ids


def complete(app, **body) -> requests.Response:
    return requests.post(f"{app.url}/completions", json={"model": LM, **body}, headers=app.headers, timeout=60)


def sse_events(response: requests.Response) -> List[Any]:
    """The data of every server-sent event, JSON-decoded except the final '[DONE]'."""
    events: List[Any] = []
    for line in response.iter_lines():
        if line:
            assert line.startswith(b"data: "), line
            data = line[len(b"data: "):]
            events.append(data.decode() if data == b"[DONE]" else json.loads(data))
    return events


def stats(version: int = 1) -> Dict[str, Any]:
    handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=APP)
    return handle.generation_stats.remote(LM, version).result(timeout_s=30)


PROMPTS = ("the quick brown", "over the la", "dog. the")


def test_greedy_completion_is_the_in_process_greedy_generation(app):
    for prompt in PROMPTS:
        text, ids = expected(app.models[0], prompt, 40)
        response = complete(app, prompt=prompt, max_tokens=40, temperature=0)
        assert response.status_code == 200, response.text
        assert response.headers["x-model-version"] == "1"
        body = response.json()
        assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == LM
        assert abs(body["created"] - time.time()) < 60
        assert body["choices"] == [{"text": text, "index": 0, "logprobs": None, "finish_reason": "length"}]
        assert ByteTokenizer().encode(body["choices"][0]["text"]) == ids  # token for token
        prompt_tokens = 1 + len(prompt)  # BOS + one byte each
        assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 40,
                                 "total_tokens": prompt_tokens + 40}
    # The model learned the text: its greedy output continues it.
    assert complete(app, prompt="the quick brown", max_tokens=20, temperature=0).json()["choices"][0]["text"] \
        == " fox jumps over the "


def test_streaming_gives_the_same_text_chunk_by_chunk_then_usage_and_done(app):
    text, _ = expected(app.models[0], PROMPTS[0], 30)
    with requests.post(f"{app.url}/completions", json={"model": LM, "prompt": PROMPTS[0], "max_tokens": 30,
                                                       "temperature": 0, "stream": True},
                       headers=app.headers, timeout=60, stream=True) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 30
    assert usage["usage"]["prompt_tokens"] == 1 + len(PROMPTS[0])
    assert len(chunks) > 1 and all(c["object"] == "text_completion" and c["id"] == usage["id"] for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    whole = complete(app, prompt=PROMPTS[0], max_tokens=30, temperature=0).json()
    assert whole["choices"][0]["text"] == text


def test_stop_and_max_tokens_are_honoured_exactly(app):
    text, _ = expected(app.models[0], "the quick brown", 40)  # " fox jumps over the lazy dog. the quick ..."
    cut = text.index("lazy")
    params: Dict[str, Any] = {"max_tokens": 40, "temperature": 0, "stop": ["zebra", "lazy"]}
    client = Client(app.deployed.base_url, api_key=app.deployed.api_key)
    assert "".join(client.stream_complete(LM, "the quick brown", **params)) == text[:cut]
    answer = complete(app, prompt="the quick brown", **params).json()
    assert answer["choices"][0] == {"text": text[:cut], "index": 0, "logprobs": None, "finish_reason": "stop"}
    # Bytes are tokens here: generation ended on the token that completed "lazy".
    assert answer["usage"]["completion_tokens"] == cut + len("lazy")
    answer = complete(app, prompt="the quick brown", max_tokens=7, temperature=0, stop="zebra").json()
    assert answer["choices"][0]["text"] == text[:7] and answer["usage"]["completion_tokens"] == 7
    assert answer["choices"][0]["finish_reason"] == "length"


def test_n_and_several_prompts_are_indexed_prompt_major_and_seeds_reproduce(app):
    body = {"prompt": ["the quick", "lazy"], "n": 2, "max_tokens": 12, "temperature": 1.0, "seed": 5}
    first, again = complete(app, **body).json(), complete(app, **body).json()
    assert [c["index"] for c in first["choices"]] == [0, 1, 2, 3]
    assert first["choices"] == again["choices"], "same seed, same text"
    assert first["usage"]["completion_tokens"] == 4 * 12
    assert first["usage"]["prompt_tokens"] == (1 + len("the quick")) + (1 + len("lazy"))  # each prompt once
    # Completion i of a prompt samples with seed + i.
    shifted = complete(app, prompt="the quick", max_tokens=12, temperature=1.0, seed=6).json()
    assert shifted["choices"][0]["text"] == first["choices"][1]["text"]
    greedy = complete(app, prompt="the quick", max_tokens=12, temperature=1.0, top_k=1, n=2).json()
    assert {c["text"] for c in greedy["choices"]} == {expected(app.models[0], "the quick", 12)[0]}


def test_the_openai_client_creates_and_streams(app):
    client = openai.OpenAI(base_url=app.url, api_key=app.deployed.api_key, max_retries=0)
    text, _ = expected(app.models[0], "the quick brown", 25)
    created = client.completions.create(model=LM, prompt="the quick brown", max_tokens=25, temperature=0)
    assert created.choices[0].text == text and created.choices[0].finish_reason == "length"
    assert created.usage is not None and created.usage.completion_tokens == 25
    chunks = list(client.completions.create(model=LM, prompt="the quick brown", max_tokens=25, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 25 + 1 + len("the quick brown")
    assert {m.id for m in client.models.list()} == {LM}, "language models only"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.url, api_key="orc_nope_nope", max_retries=0).completions.create(
            model=LM, prompt="the", max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no_such_model", prompt="the", max_tokens=2)


def test_client_complete(app):
    client = Client(app.deployed.base_url, api_key=app.deployed.api_key)
    answer = client.complete(f"{LM}:1", "over the la", max_tokens=10, temperature=0)
    assert answer["choices"][0]["text"] == expected(app.models[0], "over the la", 10)[0]
    with pytest.raises(InferenceError) as refused:
        client.complete(LM, "the", max_tokens=-1)
    assert refused.value.status == 400 and "'max_tokens' must be >= 1" in refused.value.message


def test_versions_and_aliases_name_their_own_weights(app):
    text_v2, _ = expected(app.models[1], "the quick", 15)
    for model in (f"{LM}:2", f"{LM}@candidate", f"models:/{LM}/2"):
        response = requests.post(f"{app.url}/completions", headers=app.headers, timeout=60,
                                 json={"model": model, "prompt": "the quick", "max_tokens": 15, "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.headers["x-model-version"] == "2"
        assert response.json()["choices"][0]["text"] == text_v2
    assert complete(app, prompt="the quick", max_tokens=15, temperature=0).headers["x-model-version"] == "1"
    for model in (f"{LM}:9", f"{LM}@nope"):
        response = requests.post(f"{app.url}/completions", headers=app.headers, timeout=60,
                                 json={"model": model, "prompt": "the", "max_tokens": 2})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def open_completion(app, **body) -> http.client.HTTPConnection:
    """A connection that has sent a completion request (its answer not read)."""
    connection = http.client.HTTPConnection("127.0.0.1", int(app.deployed.base_url.rsplit(":", 1)[1]), timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"model": LM, **body}),
                       {**app.headers, "Content-Type": "application/json"})
    return connection


@pytest.mark.parametrize("stream", [
    True,
    pytest.param(False, marks=pytest.mark.xfail(strict=False, reason=(
        "flaky: in the CI run of 2026-12-02 a non-streamed request whose client closed ran to its end (left the "
        "engine 1.17 s after the close, the whole generation takes 0.89 s): `request.is_disconnected()` did not see "
        "the close through HAProxy that time. Streamed requests notice it on their next chunk."))),
])
def test_a_client_that_disconnects_frees_its_slot(app, stream):
    budget = CONTEXT - 1 - len("the")
    whole = complete(app, prompt="the", max_tokens=budget, temperature=0)
    assert whole.json()["usage"]["completion_tokens"] == budget
    assert stats()["running"] == 0
    cut_short = stats()["cut_short"]
    connection = open_completion(app, prompt="the", max_tokens=budget, temperature=0, stream=stream)
    if stream:
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        assert stats()["running"] == 1, "the stream's sequence runs"
    else:  # no answer before the whole completion: wait until it runs
        wait_for(lambda: stats()["running"] == 1, 30, "the sequence to run")
    connection.close()  # mid-generation: the client goes away
    wait_for(lambda: stats()["running"] == 0, 30, "the disconnected sequence to leave the engine")
    # It left before its end (one that finished is not counted): the disconnect freed the slot, not the last
    # token. (Comparing times instead was flaky: the whole generation takes 0.3-0.9 s here.)
    assert stats()["cut_short"] == cut_short + 1, f"stream={stream}: the sequence ran to its end"
    # The engine goes on serving others.
    assert complete(app, prompt="the quick", max_tokens=5, temperature=0).status_code == 200


def test_a_full_queue_is_429_with_retry_after(app):
    budget = CONTEXT - 1 - len("the")
    holder = open_completion(app, prompt="the", max_tokens=budget, temperature=0, stream=True, n=RUNNING + WAITING)
    held = holder.getresponse()
    assert held.status == 200 and held.readline().startswith(b"data: ")
    try:
        refused = complete(app, prompt="the", max_tokens=4)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
        error = refused.json()["error"]
        assert error["code"] == "rate_limit_exceeded" and "busy" in error["message"]
    finally:
        holder.close()
    wait_for(lambda: stats()["running"] == 0, 30, "the held sequences to leave the engine")
    too_many = complete(app, prompt="the", max_tokens=4, n=RUNNING + WAITING + 1)
    assert too_many.status_code == 400 and too_many.json()["error"]["param"] == "n"


MALFORMED: List[Tuple[str, Any, int, Any]] = [
    ("bad JSON", b'{"model": "tiny_lm", "prompt": ', 400, None),
    ("not an object", [1, 2], 400, None),
    ("missing prompt", {"model": LM}, 400, "prompt"),
    ("missing model", {"prompt": "the"}, 400, "model"),
    ("empty prompt", {"model": LM, "prompt": ""}, 400, "prompt"),
    ("empty prompt list", {"model": LM, "prompt": []}, 400, "prompt"),
    ("token-id prompt", {"model": LM, "prompt": [1, 2, 3]}, 400, "prompt"),
    ("prompt of the wrong type", {"model": LM, "prompt": 5}, 400, "prompt"),
    ("negative max_tokens", {"model": LM, "prompt": "the", "max_tokens": -3}, 400, "max_tokens"),
    ("zero max_tokens", {"model": LM, "prompt": "the", "max_tokens": 0}, 400, "max_tokens"),
    ("huge max_tokens", {"model": LM, "prompt": "the", "max_tokens": 10**12}, 400, "max_tokens"),
    ("max_tokens past the context", {"model": LM, "prompt": "the", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ("max_tokens a string", {"model": LM, "prompt": "the", "max_tokens": "5"}, 400, "max_tokens"),
    ("max_tokens a boolean", {"model": LM, "prompt": "the", "max_tokens": True}, 400, "max_tokens"),
    ("max_tokens beyond 64 bits", b'{"model": "tiny_lm", "prompt": "a", "max_tokens": 1' + b"0" * 30 + b"}", 400,
     "max_tokens"),  # orjson reads it as a float
    ("temperature a string", {"model": LM, "prompt": "the", "temperature": "hot"}, 400, "temperature"),
    ("temperature too high", {"model": LM, "prompt": "the", "temperature": 9}, 400, "temperature"),
    ("top_p zero", {"model": LM, "prompt": "the", "top_p": 0}, 400, "top_p"),
    ("top_k negative", {"model": LM, "prompt": "the", "top_k": -5}, 400, "top_k"),
    ("n zero", {"model": LM, "prompt": "the", "n": 0}, 400, "n"),
    ("stop list too long", {"model": LM, "prompt": "the", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("stop an empty string", {"model": LM, "prompt": "the", "stop": [""]}, 400, "stop"),
    ("stop a number", {"model": LM, "prompt": "the", "stop": 3}, 400, "stop"),
    ("stream a string", {"model": LM, "prompt": "the", "stream": "yes"}, 400, "stream"),
    ("seed a float", {"model": LM, "prompt": "the", "seed": 1.5}, 400, "seed"),
    ("echo true", {"model": LM, "prompt": "the", "echo": True}, 400, "echo"),
    ("logprobs asked for", {"model": LM, "prompt": "the", "logprobs": 3}, 400, "logprobs"),
    ("an unknown field", {"model": LM, "prompt": "the", "temprature": 0}, 400, "temprature"),
    ("over-long prompt", {"model": LM, "prompt": "x" * CONTEXT}, 400, "prompt"),
    ("unknown model", {"model": "no_such_model", "prompt": "the"}, 404, "model"),
    ("a model name no registry can hold", {"model": "bad name!", "prompt": "the"}, 404, "model"),
    ("a classifier", {"model": CLASSIFIER, "prompt": "the"}, 400, "model"),
]


def test_malformed_requests_are_4xx_in_openais_error_body(app):
    for what, body, status, param in MALFORMED:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = requests.post(f"{app.url}/completions", data=data, timeout=60,
                                 headers={**app.headers, "Content-Type": "application/json"})
        assert response.status_code == status, (what, response.status_code, response.text)
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], (what, error)
        assert error["param"] == param, (what, error)
    prompt = complete(app, prompt="x" * CONTEXT).json()["error"]["message"]
    assert f"{CONTEXT + 1} tokens long" in prompt and f"at most {CONTEXT}" in prompt
    lengths = complete(app, prompt="the", max_tokens=CONTEXT - 2).json()["error"]["message"]
    assert f"maximum context length is {CONTEXT}" in lengths and "(4 in the prompt" in lengths
    classifier = complete(app, model=CLASSIFIER, prompt="the").json()["error"]["message"]
    assert "is a classification model, not a language model" in classifier


def test_keys_are_needed_and_their_errors_are_openais(app):
    for method, path, body in (("POST", "/completions", {"model": LM, "prompt": "the"}), ("GET", "/models", None),
                               ("POST", "/chat/completions", {"model": LM, "messages": []})):
        response = requests.request(method, f"{app.url}{path}", json=body, timeout=30)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"


def test_chat_completions_need_a_chat_template(app):
    response = requests.post(f"{app.url}/chat/completions", headers=app.headers, timeout=30,
                             json={"model": LM, "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == f"model '{LM}' has no chat template: send its prompt as text to " \
                                                  "/v1/completions"
    response = requests.post(f"{app.url}/chat/completions", headers=app.headers, timeout=30,
                             json={"model": CLASSIFIER, "messages": []})
    assert response.status_code == 400 and "not a language model" in response.json()["error"]["message"]


def test_models_lists_language_models_only(app):
    listing = requests.get(f"{app.url}/models", headers=app.headers, timeout=30).json()
    assert listing["object"] == "list"
    (entry,) = listing["data"]
    assert entry["id"] == LM and entry["object"] == "model" and entry["owned_by"] == "orchestrator"
    assert abs(entry["created"] - time.time()) < 600


def test_v2_infer_still_answers_a_language_models_logits(app):
    ids = np.array([[BOS_ID, *ByteTokenizer().encode("the quick")]], dtype=np.int64)
    response = requests.post(f"{app.deployed.base_url}/v2/models/{LM}/infer", headers=app.headers, timeout=60,
                             json={"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": list(ids.shape),
                                               "data": ids.ravel().tolist()}]})
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    assert output["name"] == "logits" and output["shape"] == [1, ids.shape[1], ByteTokenizer().vocab_size]
    with torch.no_grad():
        local = app.models[0](torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(np.asarray(output["data"], np.float32).reshape(output["shape"]), local, atol=1e-4)


def test_a_language_model_candidate_is_rolled_back_on_its_time_to_first_token(app):
    admin = f"{app.deployed.base_url}/admin/models/{LM}"
    started = requests.post(f"{admin}/rollout", json={"version": "candidate", "percent": 100}, headers=app.headers,
                            timeout=30)
    assert started.status_code == 200 and started.json()["candidate"] == 2, started.text
    served = [complete(app, prompt="the", max_tokens=3, temperature=0).headers["x-model-version"]
              for _ in range(MIN_REQUESTS + 2)]
    assert set(served) <= {"1", "2"} and "2" in served  # routing follows the table a sync interval late
    wait_for(lambda: requests.get(f"{admin}/rollout", headers=app.headers, timeout=30).json()["candidate"] is None,
             30, "the automatic rollback")
    status = requests.get(f"{admin}/rollout", headers=app.headers, timeout=30).json()
    (rollback,) = [e for e in status["events"] if e["action"] == "rollback"]
    assert rollback["dropped"] == 2 and "p99 time to first token" in rollback["reason"], rollback
    assert status["stable"] == 1


def test_generation_metrics_reach_prometheus(app):
    (node,) = [n for n in ray.nodes() if n["Alive"]]  # the embedded Ray is one node
    url = f"http://127.0.0.1:{node['MetricsExportPort']}/metrics"
    wanted = ("ray_orchestrator_time_to_first_token_ms_bucket", "ray_orchestrator_inter_token_latency_ms_bucket",
              "ray_orchestrator_generated_tokens_total", "ray_orchestrator_running_sequences",
              "ray_orchestrator_waiting_sequences")
    found: Dict[str, Any] = {}

    def exported() -> bool:
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        tokens = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("ray_orchestrator_generated_tokens_total{") and f'model="{LM}"' in line
                  and 'version="1"' in line]
        found.update(missing=[name for name in wanted if f"{name}{{" not in text], tokens=tokens)
        # The module generated thousands of tokens on v1; Ray exports every few seconds.
        return not found["missing"] and sum(tokens) > 1000

    try:
        wait_for(exported, 60, "the generation metrics in Ray's export", poll_s=2)
    except TimeoutError:
        pytest.fail(f"missing {found.get('missing')}, tiny_lm v1 tokens {found.get('tokens')}")
