"""The GPT family: a staged decoder-only transformer that is causal, ties its embeddings, builds on meta,
checkpoints activations exactly and learns; and the FLOPs, peak and MFU helpers that report on it."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from orchestrator.config import BuiltinModel, ModelConfig, ScheduleConfig, ScheduleKind, builtin_stage_names
from orchestrator.training.flops import (
    gpt_flops_per_token,
    lookup_peak,
    mfu,
    peak_flops,
    transformer_flops_per_token,
)
from orchestrator.training.gpt import GPT, parameter_count
from orchestrator.training.models import build_model
from orchestrator.training.phases import PhaseModel, forward_flops, make_aux_heads
from orchestrator.training.schedules import HEAD, expand_schedule

WIDTH, LAYERS, HEADS, CONTEXT, VOCAB = 32, 2, 2, 16, 64


def _gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    sizes = {"width": WIDTH, "layers": LAYERS, "heads": HEADS, "context": CONTEXT, **overrides}
    cfg = ModelConfig(name=BuiltinModel.gpt, **sizes)
    model = build_model(cfg, [CONTEXT], VOCAB)
    assert isinstance(model, GPT)
    return model


def _ids(batch: int = 3, length: int = CONTEXT, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))


def test_stages_are_embed_then_blocks_and_chain_to_the_model_output():
    model = _gpt().eval()
    assert model.stage_names == ["embed", "block0", "block1"]
    assert builtin_stage_names(ModelConfig(name=BuiltinModel.gpt, layers=LAYERS)) == model.stage_names
    ids = _ids()
    hidden = model.stages["embed"](ids)
    assert hidden.shape == (3, CONTEXT, WIDTH)
    for name in ("block0", "block1"):
        hidden = model.stages[name](hidden)
        assert hidden.shape == (3, CONTEXT, WIDTH)  # every block: hidden states in, hidden states out
    logits = model.head(hidden)
    assert logits.shape == (3, CONTEXT, VOCAB)
    torch.testing.assert_close(logits, model(ids), rtol=0, atol=0)


def test_a_token_never_changes_the_logits_before_it_and_shorter_sequences_work():
    model = _gpt().eval()
    ids = _ids(batch=1)
    logits = model(ids)
    for t in (0, 5, CONTEXT - 1):
        changed = ids.clone()
        changed[0, t] = (changed[0, t] + 1) % VOCAB
        other = model(changed)
        torch.testing.assert_close(other[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(other[:, t], logits[:, t])  # the change is seen where it happens
    torch.testing.assert_close(model(ids[:, :7].to(torch.int32)), logits[:, :7], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="context"):
        model(_ids(batch=1, length=CONTEXT + 1))


def test_tied_head_is_the_embedding_parameter_and_untied_is_not():
    tied, untied = _gpt(), _gpt(tie_embeddings=False)
    assert tied.lm_head.out.weight is tied.embedding.tokens.weight and tied.tied
    assert untied.lm_head.out.weight is not untied.embedding.tokens.weight and not untied.tied
    assert parameter_count(untied) - parameter_count(tied) == VOCAB * WIDTH
    # The non-embedding count drops the token and position tables only.
    assert parameter_count(tied) - parameter_count(tied, exclude_embeddings=True) == (VOCAB + CONTEXT) * WIDTH


def test_init_is_seeded_and_scales_the_residual_projections():
    a, b = _gpt(seed=3), _gpt(seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    big = _gpt(seed=0, layers=8)
    residual = torch.cat([block.mlp.proj.weight.flatten() for block in big.blocks])
    assert residual.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert big.blocks[0].mlp.fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_builds_on_meta_and_runs_with_real_weights_through_functional_call():
    model = _gpt().eval()
    with torch.device("meta"):
        skeleton = _gpt()
    assert all(p.is_meta for p in skeleton.parameters()) and skeleton.tied
    ids = _ids()
    # Weights read back from a file hold one array per state-dict name, the tied matrix under both names;
    # functional_call takes them as they are with tie_weights=False (with True it refuses two values).
    copies = {k: v.clone() for k, v in model.state_dict().items()}
    assert {"head.out.weight", "stages.embed.tokens.weight"} <= set(copies)
    out = torch.func.functional_call(skeleton.eval(), copies, (ids,), tie_weights=False)
    torch.testing.assert_close(out, model(ids), rtol=0, atol=0)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    plain, checkpointed = _gpt(dropout=0.1), _gpt(dropout=0.1, activation_checkpointing=True)
    ids = _ids()
    losses, grads = [], []
    for model in (plain, checkpointed):
        torch.manual_seed(7)  # the same dropout masks; a non-reentrant checkpoint replays them in backward
        loss = _loss(model.train(), ids)
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_few_adam_steps_learn_a_repeated_sequence():
    model = _gpt().train()
    ids = _ids(batch=4, length=CONTEXT)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = _loss(model, ids).item()
    assert first == pytest.approx(math.log(VOCAB), rel=0.05)  # small init: near-uniform predictions
    for _ in range(30):
        optimizer.zero_grad()
        _loss(model, ids).backward()
        optimizer.step()
    assert _loss(model, ids).item() < 0.5 * first


def test_layerwise_aux_heads_predict_tokens_per_position_and_tied_weights_get_one_group():
    model = _gpt()
    phases = expand_schedule(ScheduleConfig(kind=ScheduleKind.layerwise), model.stage_names, epochs=4, lr=0.01)
    aux = make_aux_heads(model, phases, VOCAB, seed=0)
    assert sorted(aux.keys()) == ["block0", "embed"]
    hidden = model.stages["embed"](_ids())
    assert aux["embed"](hidden).shape == (3, CONTEXT, VOCAB)
    # A phase on a frozen prefix starts from prepared ids, and the cache is hidden states.
    block1 = PhaseModel(model, aux, next(p for p in phases if p.output == HEAD and p.frozen_prefix))
    assert block1.features(_ids()).shape == (3, CONTEXT, WIDTH)
    everything = PhaseModel(model, aux, phases[-1])  # fine-tune: embed and the tied head both train
    groups = everything.param_groups()
    params = [id(p) for g in groups for p in g["params"]]  # type: ignore[attr-defined]
    assert len(params) == len(set(params)) and model.lm_head.out.weight.requires_grad
    torch.optim.AdamW(groups)  # raises if a parameter sits in two groups


def test_forward_flops_of_a_sequence_count_attention_on_cpu():
    model = _gpt()
    flops = forward_flops(model, nn.ModuleDict())
    block = model.blocks[0]
    matmul_params = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Linear))
    attention = 2 * 2 * CONTEXT * CONTEXT * WIDTH  # QK^T and AV, every head, one sequence
    assert flops["block0"] == pytest.approx(2 * CONTEXT * matmul_params + attention)
    assert flops[HEAD] == pytest.approx(2 * CONTEXT * WIDTH * VOCAB)
    assert flops["embed"] == 0


def test_flops_per_token_formula_by_hand():
    # 6N + 12 L H Q T: N = 1e6, 2 layers of 4 heads of 16, 128 positions.
    assert transformer_flops_per_token(1_000_000, 2, 4, 16, 128) == 6e6 + 12 * 2 * 4 * 16 * 128
    model = _gpt()
    n = parameter_count(model, exclude_embeddings=True) + VOCAB * WIDTH  # the tied head's matmul counts
    assert gpt_flops_per_token(model) == 6 * n + 12 * LAYERS * HEADS * (WIDTH // HEADS) * CONTEXT
    # 3x the forward FLOPs measured per token (6N is 3 x 2N forward; the attention term is 3 x forward too),
    # plus 6 per bias and norm parameter, which the formula counts as weights and the matmul count does not.
    forward = sum(forward_flops(model, nn.ModuleDict()).values()) / CONTEXT
    vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
    assert gpt_flops_per_token(model) == pytest.approx(3 * forward + 6 * vectors)


@pytest.mark.parametrize(("name", "bf16"), [
    ("NVIDIA H200", 989.5), ("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.5),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.05), ("NVIDIA L4", 121.0), ("NVIDIA A10G", 125.0),
])
def test_peak_table_finds_known_gpus_by_name(name, bf16):
    peak = lookup_peak(name)
    assert peak is not None and peak.bf16 == bf16


def test_peak_is_none_for_cpus_and_unknown_gpus_unless_overridden():
    assert lookup_peak("Tesla V100-SXM2-16GB").bf16 is None and lookup_peak("Tesla V100-SXM2-16GB").fp32 == 15.7
    assert lookup_peak("Some Future GPU") is None
    cpu = torch.device("cpu")
    assert peak_flops(cpu, "bf16") is None and peak_flops(cpu, "fp32") is None
    assert peak_flops(cpu, "bf16", override_tflops=2.5) == 2.5e12
    assert mfu(1000.0, 1e9, None) is None
    assert mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)


def test_gpt_needs_sequences_no_longer_than_its_context():
    with pytest.raises(ValueError, match="context"):
        build_model(ModelConfig(name=BuiltinModel.gpt, context=8), [16], VOCAB)
