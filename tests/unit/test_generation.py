"""The generation engine: the KV-cache forward matches the full one, continuous batching gives every request
the tokens it would get alone, a late request does not wait for a long one, sampling, stop strings, UTF-8,
cancellation and back-pressure; and a registry version's GPT loads zero-copy."""

from __future__ import annotations

import asyncio
from typing import Any, Coroutine, List, Sequence, Tuple

import numpy as np
import pytest
import torch

from orchestrator.config import to_config
from orchestrator.config.build import to_dict
from orchestrator.registry.tensors import to_arrays
from orchestrator.training.gpt import GPT, GPTSizes
from orchestrator.training.text import ByteTokenizer
from serve.generation import (
    EngineFull,
    GenerationEngine,
    IncrementalText,
    KVCacheDecoder,
    SamplingParams,
    TokenEvent,
    full_recompute_greedy,
    load_gpt,
    sequential_generate,
)

TOKENIZER = ByteTokenizer()
SIZES = GPTSizes(vocab_size=TOKENIZER.vocab_size, context=64, width=32, layers=2, heads=2)
PROMPTS = ["a", "hello", "The quick brown fox", "def f(x):\n    return", "import os"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def _gpt(dtype: torch.dtype = torch.float32) -> GPT:
    """A random GPT whose greedy picks are clear (top-1 leads top-2 by > 1e-3 on these prompts) and varied."""
    torch.manual_seed(0)
    model = GPT(SIZES, [SIZES.context], tie_embeddings=False).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:  # GPT-2's 0.02 makes near-uniform logits whose order float noise decides
                parameter.normal_(0, 0.2)
    return model.to(dtype).requires_grad_(False)


MODEL = _gpt()


def _run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(asyncio.wait_for(coroutine, timeout=60))


async def _collect(stream) -> Tuple[str, List[int], List[TokenEvent]]:
    events = [event async for event in stream]
    return "".join(e.text for e in events), [t for e in events for t in e.token_ids], events


def _ids(prompt: str) -> List[int]:
    return [TOKENIZER.bos_id, *TOKENIZER.encode(prompt)]


def _text(tokens: Sequence[int]) -> str:
    return TOKENIZER.decode(tokens).decode("utf-8", errors="replace")


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_cached_logits_match_the_full_forward(dtype, tolerance):
    model = _gpt(dtype)
    ids = _ids("The quick brown fox jumps over the lazy dog")
    expected = model(torch.tensor([ids]))[0].float()
    decoder = KVCacheDecoder(model, 3)
    decoder.prefill([1, 2], [ids[:3], ids[:7]])
    logits = [decoder.prefill([2], [ids[:5]])[0]]  # slot 2 rewritten by a shorter prompt
    decoder.move(2, 0)  # and moved: slot 0 goes on from where slot 2 was
    for token in ids[5:]:
        logits.append(decoder.decode([token])[0])
    assert decoder.lengths[0] == len(ids)
    torch.testing.assert_close(torch.stack(logits), expected[4:], rtol=0, atol=tolerance)


def test_sequential_generate_equals_full_recompute():
    for prompt in PROMPTS:
        tokens = full_recompute_greedy(MODEL, _ids(prompt), 30)
        assert len(tokens) == 30 and len(set(tokens)) > 5  # varied text, not one token repeated
        assert sequential_generate(MODEL, _ids(prompt), 30) == tokens


def test_engine_greedy_equals_full_recompute_alone_and_joining_at_different_steps():
    expected = [full_recompute_greedy(MODEL, _ids(p), GREEDY.max_tokens + i) for i, p in enumerate(PROMPTS)]

    async def main():
        engine = GenerationEngine(MODEL, TOKENIZER, max_running=4)
        alone = [(await _collect(engine.generate(_ids(p), GREEDY)))[1] for p in PROMPTS[:2]]
        tasks = []
        for i, prompt in enumerate(PROMPTS):  # five requests on four slots, each joining some steps later
            params = SamplingParams(max_tokens=GREEDY.max_tokens + i, temperature=0.0)
            tasks.append(asyncio.create_task(_collect(engine.generate(_ids(prompt), params))))
            for _ in range(3):
                await asyncio.sleep(0.002)
        together = await asyncio.gather(*tasks)
        engine.close()
        return alone, together

    alone, together = _run(main())
    assert alone == [want[:GREEDY.max_tokens] for want in expected[:2]]  # greedy: a shorter run is a prefix
    for (text, tokens, events), want in zip(together, expected):
        assert tokens == want  # max_tokens exactly, token for token the full recompute's
        assert [e.finish_reason for e in events] == [None] * (len(events) - 1) + ["length"]
        assert text == _text(want)


def test_a_consumer_that_falls_behind_catches_up_in_one_event_with_every_token():
    expected = full_recompute_greedy(MODEL, _ids("hello"), 30)

    async def main():
        engine = GenerationEngine(MODEL, TOKENIZER, max_running=2)
        stream = engine.generate(_ids("hello"), SamplingParams(max_tokens=30, temperature=0))
        first = await stream.__anext__()
        while engine.running:  # the engine runs on; this consumer reads nothing until it has finished
            await asyncio.sleep(0.001)
        rest = [event async for event in stream]
        engine.close()
        return first, rest

    first, rest = _run(main())
    assert len(rest) == 1 and rest[0].finish_reason == "length"  # 29 queued events, delivered as one
    assert [*first.token_ids, *rest[0].token_ids] == expected
    assert first.text + rest[0].text == _text(expected)


def test_bf16_engine_equals_bf16_full_recompute():
    model = _gpt(torch.bfloat16)

    async def main():
        engine = GenerationEngine(model, TOKENIZER, max_running=8)
        results = await asyncio.gather(*(_collect(engine.generate(_ids(p), GREEDY)) for p in PROMPTS))
        engine.close()
        return [tokens for _, tokens, _ in results]

    # Checked for this seed: no near-tie flips a greedy pick between the batched bf16 cache and the full pass.
    assert _run(main()) == [full_recompute_greedy(model, _ids(p), GREEDY.max_tokens) for p in PROMPTS]


def test_a_request_joining_a_long_generation_gets_its_first_token_within_a_step_or_two():
    order: List[str] = []

    async def consume(stream, name: str) -> None:
        async for event in stream:
            order.append(f"{name}:{event.finish_reason or ''}")

    async def main():
        engine = GenerationEngine(MODEL, TOKENIZER, max_running=4)
        long = asyncio.create_task(consume(engine.generate(_ids("a"), SamplingParams(max_tokens=60, temperature=0)),
                                           "long"))
        while len(order) < 10:
            await asyncio.sleep(0.001)
        joined_at = len(order)
        await consume(engine.generate(_ids("hello"), SamplingParams(max_tokens=3, temperature=0)), "short")
        await long
        engine.close()
        return joined_at

    joined_at = _run(main())
    first_short = order.index("short:")
    assert order.index("short:length") < order.index("long:length")
    # Between joining and its first token: the step in flight (and at most one event of the long request
    # already queued when the join was recorded); not the 50 tokens the long one has left.
    assert order[joined_at:first_short].count("long:") <= 2


def test_stop_strings_cut_the_text_exactly_and_streaming_adds_up_to_it():
    tokens = full_recompute_greedy(MODEL, _ids("hello"), 40)
    full = _text(tokens)
    stop = full[12:15]
    expected = full[:full.index(stop)]
    never = full[20:23] + "\x00never"  # its start appears, the rest never does: held back, then released

    async def main():
        engine = GenerationEngine(MODEL, TOKENIZER)
        params = SamplingParams(max_tokens=40, temperature=0, stop=("\x00unused", stop))
        stopped = await _collect(engine.generate(_ids("hello"), params))
        released = await _collect(engine.generate(_ids("hello"), SamplingParams(max_tokens=40, temperature=0,
                                                                                stop=(never,))))
        engine.close()
        return stopped, released

    (text, ids, events), (released_text, released_ids, released_events) = _run(main())
    assert text == expected and events[-1].finish_reason == "stop"
    assert ids == tokens[:len(ids)] and len(ids) < 40  # it ended at the token that completed the stop string
    assert released_text == full and released_ids == tokens and released_events[-1].finish_reason == "length"


def test_incremental_text_emits_whole_characters_and_holds_back_possible_stops():
    text = IncrementalText(TOKENIZER)
    euro = TOKENIZER.encode("€")  # three bytes, one token each
    assert [text.push(t) for t in euro] == ["", "", "€"]
    assert text.push(TOKENIZER.encode("é")[0], final=True) == "\ufffd"  # cut short: replaced at the end
    stops = IncrementalText(TOKENIZER, stop=("END",))
    assert [stops.push(t) for t in TOKENIZER.encode("xEN")] == ["x", "", ""]
    assert stops.push(TOKENIZER.encode("d")[0]) == "ENd"  # not the stop after all
    assert [stops.push(t) for t in TOKENIZER.encode("EEND")] == ["", "E", "", ""]
    assert stops.stopped and stops.text == "xENdE"


def test_sampling_is_reproducible_by_seed_and_top_k_1_is_greedy():
    prompt = _ids("hello")
    greedy = full_recompute_greedy(MODEL, prompt, 20)

    async def main():
        engine = GenerationEngine(MODEL, TOKENIZER)

        async def tokens(**params: Any) -> List[int]:
            return (await _collect(engine.generate(prompt, SamplingParams(max_tokens=20, **params))))[1]

        runs = await asyncio.gather(tokens(temperature=1.5, seed=7), tokens(temperature=1.5, seed=7),
                                    tokens(temperature=1.5, seed=8), tokens(temperature=1.0, top_k=1, seed=3),
                                    tokens(temperature=1.0, top_p=1e-6), tokens(temperature=2.0, top_k=3, seed=1))
        engine.close()
        return runs

    first, again, other, top_1, tiny_p, top_3 = _run(main())
    assert first == again and first != other
    assert top_1 == greedy and tiny_p == greedy
    logits = MODEL(torch.tensor([prompt + top_3]))[0, len(prompt) - 1:-1]
    assert all(t in row.topk(3).indices.tolist() for t, row in zip(top_3, logits))
    assert top_3 != greedy  # it did sample


def test_closing_a_stream_frees_its_slot_and_the_others_go_on():
    expected = full_recompute_greedy(MODEL, _ids("hello"), 40)

    async def main():
        engine = GenerationEngine(MODEL, TOKENIZER, max_running=3)
        closed = engine.generate(_ids("a"), SamplingParams(max_tokens=50, temperature=0))
        cancelled = engine.generate(_ids("import os"), SamplingParams(max_tokens=50, temperature=0))
        consumer = asyncio.create_task(_collect(cancelled))
        kept = asyncio.create_task(_collect(engine.generate(_ids("hello"), SamplingParams(max_tokens=40,
                                                                                          temperature=0))))
        for _ in range(3):
            await closed.__anext__()
        assert engine.running == 3
        await closed.aclose()
        consumer.cancel()  # as a client disconnect cancels the task streaming to it
        while engine.running > 1:
            await asyncio.sleep(0.001)
        freed_early = not kept.done()
        result = await kept
        engine.close()
        return freed_early, result[1], engine.cut_short

    freed_early, tokens, cut_short = _run(main())
    assert freed_early and tokens == expected
    assert cut_short == 2  # the closed and the cancelled stream; the kept one ran to its end


def test_bad_requests_fail_at_once_and_a_full_queue_raises_engine_full():
    async def main():
        steps: List[Tuple[int, int]] = []
        engine = GenerationEngine(MODEL, TOKENIZER, max_running=1, max_waiting=1,
                                  on_step=lambda running, waiting: steps.append((running, waiting)))
        with pytest.raises(ValueError, match="max_tokens"):
            engine.generate(list(range(2, 50)), SamplingParams(max_tokens=17))  # 48 + 17 > 64
        with pytest.raises(ValueError, match="prompt"):
            engine.generate([], GREEDY)
        with pytest.raises(ValueError, match="prompt"):
            engine.generate([1, SIZES.vocab_size], GREEDY)
        first = engine.generate(_ids("a"), SamplingParams(max_tokens=5, temperature=0))  # takes the slot
        second = engine.generate(_ids("b"), SamplingParams(max_tokens=5, temperature=0))  # waits
        with pytest.raises(EngineFull):
            engine.generate(_ids("c"), GREEDY)
        results = await asyncio.gather(_collect(first), _collect(second))
        engine.close()
        return steps, results

    steps, results = _run(main())
    assert [len(tokens) for _, tokens, _ in results] == [5, 5]
    assert steps[0] == (1, 1) and steps[-1][1] == 0  # on_step(running, waiting) after each step


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -1.0), ("top_p", 0.0),
                                          ("top_k", -1), ("stop", ("",))])
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_close_ends_running_requests():
    async def main():
        engine = GenerationEngine(MODEL, TOKENIZER)
        stream = engine.generate(_ids("a"), SamplingParams(max_tokens=60, temperature=0))
        await stream.__anext__()
        engine.close()
        with pytest.raises(RuntimeError, match="closed"):
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="closed"):
            engine.generate(_ids("a"), GREEDY)

    _run(main())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_gpt_runs_on_the_read_only_shared_arrays(dtype):
    model = _gpt(dtype)
    config = to_config(None, {"task.name": "causal_lm", "data.kind": "text", "model.name": "gpt",
                              "tune.metric": "val_loss", "tune.mode": "min", "model.layers": SIZES.layers,
                              "model.width": SIZES.width, "model.heads": SIZES.heads,
                              "model.context": SIZES.context, "model.tie_embeddings": False,
                              "data.context": SIZES.context})
    arrays, dtypes = to_arrays(model.state_dict())
    for array in arrays.values():
        array.flags.writeable = False  # as the object store hands them out
    manifest = {"version": 1, "config": to_dict(config), "weights": {"dtypes": dtypes},
                "signature": {"input_shape": [SIZES.context], "num_classes": SIZES.vocab_size}}
    loaded = load_gpt(manifest, arrays)
    weight = loaded.embedding.tokens.weight
    assert weight.dtype == dtype and weight.data_ptr() == arrays["stages.embed.tokens.weight"].ctypes.data
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    expected = full_recompute_greedy(model, _ids("hello"), 20)

    async def main():
        engine = GenerationEngine(loaded, TOKENIZER)
        result = await _collect(engine.generate(engine.encode_prompt("hello"), SamplingParams(max_tokens=20,
                                                                                            temperature=0)))
        engine.close()
        return result[1]

    assert _run(main()) == expected
    assert np.array_equal(arrays["head.out.weight"], to_arrays(model.state_dict())[0]["head.out.weight"])
