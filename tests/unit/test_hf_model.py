"""model.name=hf: a transformers encoder (the pretrained all-MiniLM-L6-v2 folder) as staged classifier. Its
stages reproduce HF's own forward, carry the pad mask, build offline and on meta, and a tiny one learns."""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from orchestrator.config import BuiltinModel, ModelConfig
from orchestrator.training.hf import (
    HFEncoder,
    PooledHead,
    hf_config_dict,
    resolve_model_path,
    tokenizer_json,
    weights_digest,
)
from orchestrator.training.models import build_model
from orchestrator.training.phases import _stage_output_shapes, forward_flops

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hi",
    "Orchestrator trains staged models on Ray, one frozen prefix at a time, and serves the best one.",
    "Padding must not change a sentence's meaning.",
]
TINY: Dict[str, Any] = {"model_type": "bert", "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 16, "pad_token_id": 0}
"""A from-scratch BERT small enough to train in a second."""


def _hf(**overrides) -> ModelConfig:
    return ModelConfig(name=BuiltinModel.hf, **overrides)


@pytest.fixture(scope="module")
def batch() -> Tuple[torch.Tensor, torch.Tensor]:
    """TEXTS tokenized with the folder's tokenizer.json, padded to the longest: (ids, attention mask) [B, T]."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json("").decode())
    tokenizer.enable_padding(pad_id=hf_config_dict("")["pad_token_id"])  # to the batch's longest, not 128
    encoded = tokenizer.encode_batch(TEXTS)
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    assert 0 < mask.sum(1).min() < mask.shape[1], "the batch must mix padded and full rows"
    return ids, mask


@pytest.fixture(scope="module")
def pretrained(batch) -> HFEncoder:
    model = build_model(_hf(), [batch[0].shape[1]], 3)
    assert isinstance(model, HFEncoder)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    """HF's own model on the same folder."""
    from transformers import AutoModel

    return AutoModel.from_pretrained(resolve_model_path(""), local_files_only=True).eval()


def _carried(model: HFEncoder, ids: torch.Tensor) -> List[torch.Tensor]:
    """Each stage's output, in order."""
    outputs, x = [], model.prepare(ids)
    for stage in model.stages.values():
        x = stage(x)
        outputs.append(x)
    return outputs


@torch.no_grad()
def test_stages_compose_to_hf_forward_and_mean_pool_real_tokens(pretrained, reference, batch):
    ids, mask = batch
    want = reference(input_ids=ids, attention_mask=mask).last_hidden_state
    outputs = _carried(pretrained, ids.float())  # as the tabular loader delivers ids
    assert pretrained.stage_names == ["embed"] + [f"layer{i}" for i in range(6)]
    assert all(out.shape == (*ids.shape, 384 + 1) for out in outputs)
    last = outputs[-1]
    assert (last[..., :-1] - want).abs().max().item() <= 1e-5
    assert torch.equal(last[..., -1], mask.float())
    by_hand = (want * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert (pretrained.head.pool(last) - by_hand).abs().max().item() <= 1e-5
    assert torch.allclose(pretrained(ids), pretrained.head(last))


@torch.no_grad()
def test_cls_and_pooler_pooling(reference, batch):
    ids, mask = batch
    want = reference(input_ids=ids, attention_mask=mask)
    for pooling, expected in (("cls", want.last_hidden_state[:, 0]), ("pooler", want.pooler_output)):
        model = build_model(_hf(pooling=pooling), [ids.shape[1]], 2).eval()
        assert isinstance(model, HFEncoder) and isinstance(model.head, PooledHead)
        assert (model.head.pool(_carried(model, ids)[-1]) - expected).abs().max().item() <= 1e-5
        aux = model.make_aux_head("layer2", (ids.shape[1], 385), 5)
        assert aux(_carried(model, ids)[2]).shape == (len(TEXTS), 5)
        if pooling == "pooler":  # the aux head trains its own copy of the pooler, never the model head's
            assert isinstance(aux, PooledHead) and aux.pooler is not model.head.pooler


def _guard_network(monkeypatch) -> List[str]:
    """Make every non-loopback connect or name lookup raise, and record it (a library might swallow the error)."""
    attempts: List[str] = []

    def loopback(host: object) -> bool:
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return host == "localhost"

    def refuse(what: str) -> None:
        attempts.append(what)
        raise OSError(f"test forbids network access: {what}")

    real_connect, real_connect_ex, real_getaddrinfo = socket.socket.connect, socket.socket.connect_ex, \
        socket.getaddrinfo

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address[0]):
            refuse(f"connect {address}")
        return real_connect(self, address)

    def connect_ex(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not loopback(address[0]):
            refuse(f"connect_ex {address}")
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and not loopback(host):
            refuse(f"getaddrinfo {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def test_building_never_reaches_the_network(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = _guard_network(monkeypatch)
    with pytest.raises(OSError):  # the guard itself works
        socket.create_connection(("203.0.113.1", 443), timeout=1)
    attempts.clear()
    pretrained = build_model(_hf(), [8], 2)
    scratch = build_model(_hf(from_scratch=True), [8], 2)
    assert attempts == []
    assert pretrained(pretrained.example_input(1)).shape == scratch(scratch.example_input(1)).shape == (1, 2)


def test_from_scratch_has_the_architecture_but_not_the_weights(pretrained):
    torch.manual_seed(0)
    scratch = build_model(_hf(from_scratch=True), list(pretrained.input_shape), 3)
    trained = {n: p.shape for n, p in pretrained.named_parameters()}
    assert {n: p.shape for n, p in scratch.named_parameters()} == trained
    for name in ("stages.embed.embeddings.word_embeddings.weight", "stages.layer5.layer.output.dense.weight"):
        assert not torch.allclose(scratch.get_parameter(name), pretrained.get_parameter(name))


def test_a_recorded_config_builds_on_meta_without_the_folder(tmp_path: Path, pretrained, batch):
    cfg = _hf(path=str(tmp_path / "no-such-folder"), hf_config=hf_config_dict(""))
    with torch.device("meta"):
        meta = build_model(cfg, list(pretrained.input_shape), 3)
    tensors = [*meta.parameters(), *meta.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert meta.stage_names == pretrained.stage_names
    # As serving runs it: the meta model called with the registry's weights by name (serve/servable.py).
    weights = pretrained.state_dict()
    assert set(weights) == set(meta.state_dict())
    ids = batch[0]
    with torch.no_grad():
        served = torch.func.functional_call(meta.eval(), weights, (ids,), tie_weights=False)
        assert torch.allclose(served, pretrained(ids), atol=1e-6)


@torch.no_grad()
def test_bf16_autocast_keeps_the_mask_channel(pretrained, batch):
    ids, mask = batch
    fp32 = pretrained.head.pool(_carried(pretrained, ids)[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = _carried(pretrained, ids)
        logits = pretrained.head(outputs[-1])
    for out in outputs:
        assert torch.equal(out[..., -1].float(), mask.float())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    pooled = pretrained.head.pool(outputs[-1].float())
    assert torch.nn.functional.cosine_similarity(pooled, fp32).min().item() > 0.99


def test_example_input_is_real_tokens_and_flops_count_every_layer(pretrained):
    example = pretrained.example_input(2)
    assert example.shape == (2, *pretrained.input_shape) and (example != 0).all()
    length = pretrained.input_shape[0]
    assert set(_stage_output_shapes(pretrained).values()) == {(length, 385)}
    flops = forward_flops(pretrained, nn.ModuleDict())
    per_layer = {flops[f"layer{i}"] for i in range(6)}
    assert len(per_layer) == 1
    # 2 FLOPs per multiply-add: 12·H² weights per token, plus QK^T and AV over the sequence.
    hidden = 384
    assert per_layer.pop() == pytest.approx(length * (24 * hidden**2 + 4 * length * hidden), rel=0.01)


def test_helpers_find_the_installed_folder(tmp_path: Path):
    folder = Path(resolve_model_path(""))
    assert (folder / "config.json").is_file()
    assert weights_digest("") == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    assert hf_config_dict("")["hidden_size"] == 384
    with pytest.raises(ValueError, match="model.path"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="512 tokens"):
        build_model(_hf(hf_config=hf_config_dict("")), [513], 2)


def test_model_hf_composes(compose):
    model = OmegaConf.to_object(compose(["model=hf"]).model)  # the model group alone: data is another's concern
    assert isinstance(model, ModelConfig)
    assert (model.name, model.pooling, model.path, model.from_scratch, model.dropout) == ("hf", "mean", "", False, 0.1)
    with pytest.raises(ValueError, match="model.pooling"):
        _hf(pooling="max")


def test_a_tiny_from_scratch_encoder_learns():
    torch.manual_seed(0)
    model = build_model(_hf(hf_config=TINY), [12], 2)
    # Label: does token 7 occur among a row's real tokens? Rows have 3..12 tokens, the rest is pad (0).
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, TINY["vocab_size"], (32, 12), generator=generator)
    lengths = torch.randint(3, 13, (32,), generator=generator)
    ids[torch.arange(12)[None] >= lengths[:, None]] = 0
    ids[::2, 0] = 7
    labels = (ids == 7).any(1).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        loss = nn.functional.cross_entropy(model(ids.float()), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.25 * losses[0]


def test_activation_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = build_model(_hf(hf_config={**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
                                activation_checkpointing=checkpointed), [8], 2)
        ids = torch.randint(1, 100, (4, 8), generator=torch.Generator().manual_seed(2))
        model(ids).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0] and grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
