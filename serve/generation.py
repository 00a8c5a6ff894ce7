"""Text generation for a served GPT: a slot KV cache, continuous batching and per-request sampling.

`KVCacheDecoder` runs the GPT's own modules over a preallocated cache, K and V per layer of shape
[slots, heads, context, head_dim] and a length per slot: `prefill` writes prompts into slots (causal
attention over each prompt), `decode` advances every occupied slot by one token in one batched
forward, each attending to its own keys 0..length under a boolean mask, so sequences of different
lengths share a step. Occupied slots are always 0..n-1 (a freed slot takes the last one's cache),
so a step attends over views of the cache and never gathers it.

`GenerationEngine` owns one decoder and one background loop on the serving event loop. Between
steps it admits waiting requests (one padded prefill for all of them) and drops finished and
cancelled ones; every model pass runs in a worker thread, so the loop keeps serving HTTP while the
model computes. A request that arrives during a long generation waits for at most the step in
flight and its own prefill.

Text leaves as complete UTF-8 characters (`IncrementalText`); a stop string ends a generation and
is cut from its text, and while streaming, text that may still turn into a stop string is held
back until it is known not to. The tokenizer has no end-of-text token: a generation ends at a stop
string or at `max_tokens`.
"""

from __future__ import annotations

import asyncio
import codecs
import math
import secrets
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Deque, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.config.schema import require
from orchestrator.training.gpt import GPT, Block
from orchestrator.training.text import PAD_ID, TextTokenizer

# ------------------------------------------------------------------------------------------ interface


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request chooses its tokens and when it ends."""

    max_tokens: int = 16
    """Tokens to generate at most: exactly this many unless a stop string comes first."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (the most likely token, no randomness)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of likeliest tokens whose probability reaches top_p (1.0: off)."""
    top_k: int = 0
    """Sample among the k likeliest tokens only (0: off)."""
    stop: Tuple[str, ...] = ()
    """Strings that end the generation; the text returned stops right before the first one to appear."""
    seed: Optional[int] = None
    """Seeds this request's own generator: same seed and prompt, same text (None: random)."""

    def __post_init__(self) -> None:
        # A list from a JSON body is taken as the tuple it stands for.
        object.__setattr__(self, "stop", tuple(self.stop))
        require(self.max_tokens >= 1, "max_tokens", f"must be >= 1, got {self.max_tokens}")
        require(math.isfinite(self.temperature) and self.temperature >= 0, "temperature",
                f"must be a finite number >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, "top_k", f"must be >= 0 (0: off), got {self.top_k}")
        require(all(isinstance(s, str) and s for s in self.stop), "stop", f"must be non-empty strings, got {self.stop}")


@dataclass(frozen=True)
class TokenEvent:
    """What one generation step adds to a request's output."""

    text: str
    """New text since the last event ('' while bytes of a character or a possible stop string are held back)."""
    token_ids: Tuple[int, ...]
    """The tokens this event accounts for."""
    finish_reason: Optional[str]
    """None until the last event; then 'stop' (a stop string appeared) or 'length' (max_tokens reached)."""


class EngineFull(Exception):
    """The waiting queue is full: the route answers 429 with Retry-After."""


# ------------------------------------------------------------------------------------------ the cached forward


class KVCacheDecoder:
    """`model`'s forward over a KV cache of `slots` sequences (eval mode; never writes the model's weights).

    Occupied slots are 0..n-1. The cache holds the weights' dtype (bf16 weights, a bf16 cache); logits
    come back as float32 [sequences, vocab].
    """

    def __init__(self, model: GPT, slots: int):
        sizes = model.sizes
        weight = model.embedding.tokens.weight
        shape = (sizes.layers, slots, sizes.heads, sizes.context, sizes.head_dim)
        self.model = model
        self.keys = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.values = torch.zeros(shape, dtype=weight.dtype, device=weight.device)
        self.lengths: List[int] = [0] * slots
        """Tokens cached in each slot."""
        self._positions = torch.arange(sizes.context, device=weight.device)

    @torch.inference_mode()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Write `prompts` into `slots` (replacing what they held); logits after each prompt's last token.

        Prompts of different lengths go in one forward, right-padded: attention is causal, so no real
        token sees a pad, and the pads' keys sit past each slot's length, masked until decoding overwrites them.
        """
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([list(p) + [PAD_ID] * (longest - len(p)) for p in prompts], device=self._positions.device)
        rows = torch.tensor(list(slots), device=ids.device)
        x = self.model.embedding(ids)
        for layer, block in enumerate(self.model.blocks):
            q, k, v = _qkv(block, x)
            self.keys[layer, rows, :, :longest] = k
            self.values[layer, rows, :, :longest] = v
            x = _finish_block(block, x, F.scaled_dot_product_attention(q, k, v, is_causal=True))
        for slot, prompt in zip(slots, prompts):
            self.lengths[slot] = len(prompt)
        last = torch.tensor([len(p) - 1 for p in prompts], device=ids.device)
        return self.model.lm_head(x[torch.arange(len(prompts), device=ids.device), last]).float()

    @torch.inference_mode()
    def decode(self, tokens: Sequence[int]) -> torch.Tensor:
        """Feed one token to each of slots 0..len(tokens)-1, at the slot's own position; logits after it."""
        count = len(tokens)
        lengths = self.lengths[:count]
        span = max(lengths) + 1
        device = self._positions.device
        positions = torch.tensor(lengths, device=device)
        rows = self._positions[:count]
        embedding = self.model.embedding
        x = (embedding.tokens(torch.tensor(list(tokens), device=device)) + embedding.positions(positions))[:, None]
        mask = (self._positions[:span] <= positions[:, None])[:, None, None]  # [count, 1, 1, span]: own keys 0..len
        for layer, block in enumerate(self.model.blocks):
            q, k, v = _qkv(block, x)
            self.keys[layer, rows, :, positions] = k[:, :, 0]
            self.values[layer, rows, :, positions] = v[:, :, 0]
            keys, values = self.keys[layer, :count, :, :span], self.values[layer, :count, :, :span]
            x = _finish_block(block, x, F.scaled_dot_product_attention(q, keys, values, attn_mask=mask))
        self.lengths[:count] = [n + 1 for n in lengths]
        return self.model.lm_head(x[:, 0]).float()

    @torch.inference_mode()
    def move(self, source: int, target: int) -> None:
        """Slot `source`'s sequence into slot `target` (what `target` held is dropped)."""
        length = self.lengths[source]
        self.keys[:, target, :, :length] = self.keys[:, source, :, :length]
        self.values[:, target, :, :length] = self.values[:, source, :, :length]
        self.lengths[target] = length


def _qkv(block: Block, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values [B, heads, T, head_dim] of `block`'s attention on hidden states [B, T, width]."""
    batch, length, width = x.shape
    heads = block.attn.heads
    q, k, v = block.attn.qkv(block.attn_norm(x)).view(batch, length, 3, heads, width // heads).permute(2, 0, 3, 1, 4)
    return q, k, v


def _finish_block(block: Block, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
    """The rest of `block` (as Block._forward, eval mode) once its attention gave `attended` [B, heads, T, head_dim]."""
    batch, length, width = x.shape
    x = x + block.attn.proj(attended.transpose(1, 2).reshape(batch, length, width))
    return x + block.mlp(block.mlp_norm(x))


# ------------------------------------------------------------------------------------------ sampling


def sample_tokens(logits: torch.Tensor, params: Sequence[SamplingParams],
                  generators: Sequence[Optional[torch.Generator]]) -> List[int]:
    """One token per row of `logits` [n, vocab], each by its own params (greedy rows need no generator)."""
    tokens = logits.argmax(-1)
    sampled = [i for i, p in enumerate(params) if p.temperature > 0]
    if sampled:
        tokens[sampled] = _sample_rows(logits[sampled], [params[i] for i in sampled], [generators[i] for i in sampled])
    return tokens.tolist()


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[Optional[torch.Generator]]) -> torch.Tensor:
    """Inverse-CDF sampling: one uniform draw per row from that request's generator, so its seed alone decides."""
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]
    probs = torch.softmax(logits / temperature, dim=-1)
    uniforms = torch.cat([torch.rand(1, generator=g) for g in generators]).to(device)[:, None]
    order: Optional[torch.Tensor] = None
    if any(p.top_k or p.top_p < 1 for p in params):  # sorting the vocabulary costs: only when a row filters
        probs, order = probs.sort(dim=-1, descending=True)
        probs = probs * _kept(probs, params)
    cdf = probs.cumsum(dim=-1)
    picks = torch.searchsorted(cdf, uniforms * cdf[:, -1:]).clamp_(max=logits.shape[-1] - 1)
    return (picks if order is None else order.gather(1, picks))[:, 0]


def _kept(sorted_probs: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Which of each row's tokens (likeliest first) survive its top_k and top_p; the likeliest always does."""
    device, vocab = sorted_probs.device, sorted_probs.shape[-1]
    top_k = torch.tensor([p.top_k or vocab for p in params], device=device)[:, None]
    top_p = torch.tensor([p.top_p for p in params], device=device)[:, None]
    ranks = torch.arange(vocab, device=device)
    return (ranks < top_k) & (sorted_probs.cumsum(dim=-1) - sorted_probs < top_p)


# ------------------------------------------------------------------------------------------ text


class IncrementalText:
    """Generated tokens -> the text to send after each: complete UTF-8 characters, stop strings cut off.

    `push` returns only text that is final: bytes of an unfinished character wait for the rest (bytes
    that never finish one become U+FFFD, at once when invalid, at the end when cut short), and a tail
    that could be the start of a stop string waits until it is known not to be one.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = tuple(stop)
        self._longest_stop = max((len(s) for s in self._stop), default=0)
        self.text = ""
        """All text decoded so far (after a stop: the text before it)."""
        self.stopped = False
        """Whether a stop string appeared (the generation is over)."""
        self._sent = 0

    def push(self, token: int, *, final: bool = False) -> str:
        """The new text `token` makes final; with `final` (the last token) everything left is."""
        before = len(self.text)
        self.text += self._decoder.decode(self._tokenizer.decode([token]), final)
        cut = self._first_stop(max(0, before - self._longest_stop + 1))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            return self._send(cut)
        return self._send(len(self.text) if final else len(self.text) - self._held_back())

    def _first_stop(self, start: int) -> Optional[int]:
        """Where the earliest stop string begins, looking only at those that end at or after `start`."""
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        return min(found, default=None)

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string (not all of it: that would have stopped)."""
        held = 0
        for stop in self._stop:
            held = max(held, next((n for n in range(len(stop) - 1, held, -1) if self.text.endswith(stop[:n])), 0))
        return held

    def _send(self, end: int) -> str:
        end = max(end, self._sent)
        new, self._sent = self.text[self._sent:end], end
        return new


# ------------------------------------------------------------------------------------------ requests


@dataclass(eq=False)
class _Request:
    """One generation in the engine: its prompt, sampling, text so far and the queue its stream reads."""

    prompt: List[int]
    params: SamplingParams
    text: IncrementalText
    generator: Optional[torch.Generator]
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    produced: int = 0
    last_token: int = PAD_ID
    """The latest token: what the next decode step feeds."""
    cancelled: bool = False

    def accept(self, token: int) -> TokenEvent:
        """`token` as this request's next one: the event it makes."""
        self.produced += 1
        self.last_token = token
        last = self.produced == self.params.max_tokens
        text = self.text.push(token, final=last)
        reason = "stop" if self.text.stopped else "length" if last else None
        return TokenEvent(text, (token,), reason)


Delivery = List[Tuple[_Request, Union[TokenEvent, BaseException]]]


class GenerationStream(AsyncIterator[TokenEvent]):
    """What `GenerationEngine.generate` returns: an AsyncIterator of its request's events, in order, with aclose().

    Closing it (aclose, the consuming task cancelled, or dropping it) cancels the request: the engine
    frees its slot before the next step.
    """

    def __init__(self, engine: GenerationEngine, request: _Request):
        self._engine, self._request = engine, request
        self._done = False
        self._error: Optional[BaseException] = None
        """A failure queued behind events already joined into one (raised by the next call)."""

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        if self._error is not None:
            self._done = True
            raise self._error
        try:
            item = await self._request.events.get()
        except asyncio.CancelledError:  # the consumer went away (e.g. a client disconnect)
            self._cancel()
            raise
        if isinstance(item, BaseException):
            self._done = True
            raise item
        item = self._with_queued(item)
        self._done = item.finish_reason is not None
        return item

    def _with_queued(self, event: TokenEvent) -> TokenEvent:
        """`event` joined with the events already queued behind it: a consumer that fell behind the engine
        (a busy event loop, a slow client) catches up in one event, not one per token, as vLLM's streams do.
        A failure queued behind them is raised by the next call."""
        queue = self._request.events
        texts, tokens = [event.text], list(event.token_ids)
        while event.finish_reason is None and not queue.empty():
            item = queue.get_nowait()
            if isinstance(item, BaseException):
                self._error = item
                break
            event = item
            texts.append(event.text)
            tokens.extend(event.token_ids)
        return event if len(texts) == 1 else TokenEvent("".join(texts), tuple(tokens), event.finish_reason)

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        if not self._done:
            self._done = True
            self._engine._cancel(self._request)

    def __del__(self) -> None:
        # Possibly on another thread (GC): only a flag, which the loop reads between steps.
        if not self._done:
            self._request.cancelled = True


# ------------------------------------------------------------------------------------------ the engine


class _Batch:
    """The running requests, request i in cache slot i, and the decoder they share (used by one thread at a time)."""

    def __init__(self, model: GPT, slots: int):
        self.decoder = KVCacheDecoder(model, slots)
        self.slots = slots
        self.requests: List[_Request] = []

    @property
    def free(self) -> int:
        return self.slots - len(self.requests)

    def admit(self, requests: List[_Request]) -> Delivery:
        """Prefill `requests` into the free slots; their first tokens."""
        start = len(self.requests)
        self.requests.extend(requests)
        logits = self.decoder.prefill(range(start, start + len(requests)), [r.prompt for r in requests])
        return self._advance(requests, logits)

    def step(self) -> Delivery:
        """One token for every running request."""
        logits = self.decoder.decode([r.last_token for r in self.requests])
        return self._advance(list(self.requests), logits)

    def _advance(self, requests: List[_Request], logits: torch.Tensor) -> Delivery:
        tokens = sample_tokens(logits, [r.params for r in requests], [r.generator for r in requests])
        delivery: Delivery = [(r, r.accept(t)) for r, t in zip(requests, tokens)]
        for request, event in delivery:
            if isinstance(event, TokenEvent) and event.finish_reason is not None:
                self.drop(request)
        return delivery

    def drop(self, request: _Request) -> None:
        """Free `request`'s slot: the last slot's sequence moves into it, so slots 0..n-1 stay the occupied ones."""
        slot, last = self.requests.index(request), len(self.requests) - 1
        if slot != last:
            self.decoder.move(last, slot)
            self.requests[slot] = self.requests[last]
        self.requests.pop()


class GenerationEngine:
    """Continuous batching of generations on one GPT, for an asyncio server (one replica's model).

    `generate` queues a request and returns its stream of `TokenEvent`s. A background loop, started on
    the running event loop by the first `generate`, admits waiting requests into free slots between
    steps and runs one batched decode step for all running requests at a time, in a worker thread.
    """

    def __init__(self, model: GPT, tokenizer: TextTokenizer, *, max_running: int = 32, max_waiting: int = 64,
                 on_step: Optional[Callable[[int, int], None]] = None):
        require(max_running >= 1, "max_running", f"must be >= 1, got {max_running}")
        require(max_waiting >= 0, "max_waiting", f"must be >= 0, got {max_waiting}")
        self._model = model.eval()
        self._tokenizer = tokenizer
        self._batch = _Batch(model, max_running)
        self._waiting: Deque[_Request] = deque()
        self._max_waiting = max_waiting
        self._on_step = on_step
        self._task: Optional[asyncio.Task] = None
        self._work = asyncio.Event()
        self._closed = False
        self.cut_short = 0
        """Sequences that left before their end because their stream was closed (a client that went away)."""

    @property
    def context(self) -> int:
        """The longest prompt + completion, in tokens."""
        return self._model.sizes.context

    @property
    def running(self) -> int:
        return len(self._batch.requests)

    @property
    def waiting(self) -> int:
        return sum(not r.cancelled for r in self._waiting)

    def encode_prompt(self, prompt: str) -> List[int]:
        """BOS + the prompt's tokens: how every training document began."""
        return [self._tokenizer.bos_id, *self._tokenizer.encode(prompt)]

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationStream:
        """Queue a generation after `prompt_ids` (call it on the serving event loop); its events, as they come.

        Raises at once: ValueError for an empty prompt, an id outside the vocabulary, or a prompt plus
        max_tokens longer than `context`; EngineFull when `max_waiting` requests already wait for a slot;
        RuntimeError once closed.
        """
        if self._closed:
            raise RuntimeError("the generation engine is closed")
        prompt = [int(i) for i in prompt_ids]
        self._check_prompt(prompt, params)
        if self.waiting >= self._max_waiting + self._batch.free:
            raise EngineFull(f"{self.waiting} requests already wait for one of {self._batch.slots} generation slots")
        self._ensure_loop()
        generator = None
        if params.temperature > 0:
            generator = torch.Generator().manual_seed(secrets.randbits(63) if params.seed is None else params.seed)
        request = _Request(prompt, params, IncrementalText(self._tokenizer, params.stop), generator)
        self._waiting.append(request)
        self._work.set()
        return GenerationStream(self, request)

    def close(self) -> None:
        """Stop the loop; requests still waiting or running end with RuntimeError. Safe from any thread."""
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.get_loop().call_soon_threadsafe(self._task.cancel)

    def _check_prompt(self, prompt: List[int], params: SamplingParams) -> None:
        vocab = self._model.sizes.vocab_size
        require(bool(prompt), "prompt", "must hold at least one token")
        require(all(0 <= i < vocab for i in prompt), "prompt", f"holds token ids outside the vocabulary [0, {vocab})")
        require(len(prompt) + params.max_tokens <= self.context, "max_tokens",
                f"{params.max_tokens} after a prompt of {len(prompt)} tokens exceeds the model's context of "
                f"{self.context} tokens")

    def _ensure_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return
        # A loop that ended (or another event loop's): its requests are gone with it.
        self._batch.requests.clear()
        self._waiting.clear()
        self._work = asyncio.Event()
        self._task = loop.create_task(self._serve())

    def _cancel(self, request: _Request) -> None:
        request.cancelled = True
        if request in self._waiting:
            self._waiting.remove(request)

    async def _serve(self) -> None:
        try:
            while True:
                await self._iterate()
        except asyncio.CancelledError:
            self._fail([*self._waiting, *self._batch.requests], RuntimeError("the generation engine closed"))
            raise

    async def _iterate(self) -> None:
        """Admit what fits, then one step for everything running (or sleep until a request comes)."""
        self._drop_cancelled()
        admitted = self._admissions()
        if admitted:
            await self._run(self._batch.admit, admitted)
            self._drop_cancelled()
        if not self._batch.requests:
            if not self._waiting:
                self._work.clear()
                await self._work.wait()
            return
        await self._run(self._batch.step)
        if self._on_step is not None:
            self._on_step(self.running, self.waiting)

    def _admissions(self) -> List[_Request]:
        admitted: List[_Request] = []
        while self._waiting and len(admitted) < self._batch.free:
            request = self._waiting.popleft()
            if not request.cancelled:
                admitted.append(request)
        return admitted

    def _drop_cancelled(self) -> None:
        for request in [r for r in self._batch.requests if r.cancelled]:
            self._batch.drop(request)
            self.cut_short += 1

    async def _run(self, work: Callable[..., Delivery], *args: Any) -> None:
        """`work` in a worker thread, then its events to their streams; a failed pass fails every running request."""
        involved = [*self._batch.requests, *(args[0] if args else [])]
        try:
            delivery = await asyncio.to_thread(work, *args)
        except Exception as error:  # the cache no longer matches the requests: none of them can go on
            self._batch.requests.clear()
            delivery = [(r, error) for r in involved]
        for request, item in delivery:
            if not request.cancelled:
                request.events.put_nowait(item)

    def _fail(self, requests: Sequence[_Request], error: BaseException) -> None:
        for request in requests:
            request.events.put_nowait(error)
        self._waiting.clear()
        self._batch.requests.clear()


# ------------------------------------------------------------------------------------------ loading and baselines


def load_gpt(manifest: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> GPT:
    """The registry version's GPT on its shared arrays (zero-copy: built on meta, then
    load_state_dict(assign=True) with `shared_tensors` / `weights_dtypes`), eval mode, no gradients.

    Raises ValueError when the manifest's model is not a GPT or the arrays do not fit it.
    """
    from orchestrator.registry.servable import meta_model, shared_tensors
    from orchestrator.registry.store import weights_dtypes

    model = meta_model(manifest)
    if not isinstance(model, GPT):
        raise ValueError(f"registry version {manifest.get('version')} is a {type(model).__name__}, not a GPT")
    model.load_state_dict(shared_tensors(arrays, model, weights_dtypes(manifest)), assign=True)
    return model.requires_grad_(False).eval()


def sequential_generate(model: GPT, prompt_ids: Sequence[int], max_tokens: int, *,
                        stop_at_eos: bool = False) -> List[int]:
    """Greedy tokens after `prompt_ids`, one sequence, a plain per-token loop on its own one-slot KV cache:
    the hand-written in-process loop the engine is measured against.

    The tokenizer has no end-of-text token; with `stop_at_eos` a special id (PAD or BOS, which stand for
    no text) ends the generation in its place, and is not returned.
    """
    decoder = KVCacheDecoder(model.eval(), 1)
    logits = decoder.prefill([0], [list(prompt_ids)])
    tokens: List[int] = []
    while True:
        token = int(logits[0].argmax())
        if stop_at_eos and token in (PAD_ID, TextTokenizer.bos_id):
            return tokens
        tokens.append(token)
        if len(tokens) == max_tokens:
            return tokens
        logits = decoder.decode([token])


@torch.inference_mode()
def full_recompute_greedy(model: GPT, prompt_ids: Sequence[int], max_tokens: int) -> List[int]:
    """Reference: greedy tokens after `prompt_ids`, re-running the whole model on the whole sequence each step."""
    ids = list(prompt_ids)
    device = model.eval().embedding.tokens.weight.device
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids], device=device))[0, -1].argmax()))
    return ids[len(prompt_ids):]
