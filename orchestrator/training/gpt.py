"""A decoder-only transformer (GPT-2 style, pre-norm) whose blocks are stages.

Stages: `embed` (token + learned position embedding), `block0` .. `block{L-1}` (each takes and returns
hidden states [B, T, width]), then the head (final LayerNorm + projection to the vocabulary). Because
every block is a stage, FSDP2 wraps each block, the pipeline plan cuts between blocks and layer-staged
schedules freeze and cache blocks, exactly as for the small models.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from orchestrator.config import ModelConfig
from orchestrator.training.models import StagedModel

INIT_STD = 0.02
"""GPT-2's initial weight scale for every linear and embedding matrix."""


@dataclass(frozen=True, kw_only=True)
class GPTSizes:
    """The sizes of one GPT: what its FLOPs and parameter counts are computed from."""

    vocab_size: int
    """Tokens the embedding and head know."""
    context: int
    """Positions of the position embedding: the longest sequence the model accepts."""
    width: int
    """Hidden size."""
    layers: int
    """Transformer blocks."""
    heads: int
    """Attention heads per block."""
    mlp_ratio: int = 4
    """Each block's MLP hidden size as a multiple of `width`."""
    dropout: float = 0.0
    """Dropout on embeddings, attention weights and residual branches."""

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


class Embedding(nn.Module):
    """Token ids [B, T] (int64 or int32, T <= context) -> hidden states [B, T, width]."""

    def __init__(self, sizes: GPTSizes):
        super().__init__()
        self.context = sizes.context
        self.tokens = nn.Embedding(sizes.vocab_size, sizes.width)
        self.positions = nn.Embedding(sizes.context, sizes.width)
        self.dropout = nn.Dropout(sizes.dropout)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        length = ids.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the model's context ({self.context})")
        positions = torch.arange(length, device=ids.device)
        return self.dropout(self.tokens(ids) + self.positions(positions))


class CausalSelfAttention(nn.Module):
    def __init__(self, sizes: GPTSizes):
        super().__init__()
        self.heads, self.dropout = sizes.heads, sizes.dropout
        self.qkv = nn.Linear(sizes.width, 3 * sizes.width)
        self.proj = nn.Linear(sizes.width, sizes.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # [B, T, 3W] -> three [B, heads, T, head_dim]
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)); hidden states in, hidden states out."""

    def __init__(self, sizes: GPTSizes, *, activation_checkpointing: bool = False):
        super().__init__()
        hidden = sizes.mlp_ratio * sizes.width
        self.activation_checkpointing = activation_checkpointing
        self.attn_norm = nn.LayerNorm(sizes.width)
        self.attn = CausalSelfAttention(sizes)
        self.mlp_norm = nn.LayerNorm(sizes.width)
        self.mlp = MLP(sizes.width, hidden)
        self.dropout = nn.Dropout(sizes.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with frozen inputs, autocast and FSDP2, and recomputes dropout masks exactly.
            return checkpoint(self._forward, x, use_reentrant=False)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x)))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class LMHead(nn.Module):
    """Hidden states [B, T, width] -> next-token logits [B, T, vocab]; also the aux head a phase trains on a block."""

    def __init__(self, width: int, vocab_size: int, *, bias: bool):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x))


class GPT(StagedModel):
    """A decoder-only transformer: token ids [B, T] -> logits [B, T, vocab] for the token after each position.

    `input_shape` is [T], the sequence length it trains on (at most `sizes.context`); any shorter length
    works too, which is what serving needs. With `tie_embeddings` the head's weight IS the token embedding's.
    """

    def __init__(self, sizes: GPTSizes, input_shape: Sequence[int], *, tie_embeddings: bool = True,
                 activation_checkpointing: bool = False):
        if len(input_shape) != 1 or not 1 <= input_shape[0] <= sizes.context:
            raise ValueError(f"a GPT takes sequences of at most model.context={sizes.context} tokens; "
                             f"data gives input_shape {list(input_shape)}")
        embed = Embedding(sizes)
        blocks = [Block(sizes, activation_checkpointing=activation_checkpointing) for _ in range(sizes.layers)]
        head = LMHead(sizes.width, sizes.vocab_size, bias=False)
        stages: OrderedDict[str, nn.Module] = OrderedDict(embed=embed)
        stages.update((f"block{i}", block) for i, block in enumerate(blocks))
        super().__init__(stages, head, input_shape)
        self.sizes = sizes
        self.apply(_init_weights)
        for block in blocks:
            for projection in (block.attn.proj, block.mlp.proj):
                # GPT-2: residual branches scaled so the residual stream's variance does not grow with depth.
                nn.init.normal_(projection.weight, std=INIT_STD / math.sqrt(2 * sizes.layers))
        if tie_embeddings:
            head.out.weight = embed.tokens.weight

    @property
    def embedding(self) -> Embedding:
        return cast(Embedding, self.stages["embed"])

    @property
    def blocks(self) -> List[Block]:
        return [cast(Block, stage) for name, stage in self.stages.items() if name != "embed"]

    @property
    def lm_head(self) -> LMHead:
        return cast(LMHead, self.head)

    @property
    def tied(self) -> bool:
        """Whether the head's weight is the token embedding's (one Parameter)."""
        return self.lm_head.out.weight is self.embedding.tokens.weight

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids pass as they are: no reshape, so any length up to the context works."""
        return x

    def example_input(self, n: int) -> torch.Tensor:
        """`n` sequences of the training length: a sample of a GPT is one sequence."""
        return torch.zeros(n, *self.input_shape, dtype=torch.int64)

    def make_aux_head(self, stage: str, stage_output_shape: tuple, num_outputs: int) -> nn.Module:
        """LayerNorm + Linear(width, vocab) per position: next-token logits from a block's hidden states."""
        head = LMHead(stage_output_shape[-1], num_outputs, bias=True)
        head.apply(_init_weights)
        return head


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=INIT_STD)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def build_gpt(cfg: ModelConfig, input_shape: Sequence[int], *, vocab_size: int) -> GPT:
    """The GPT `cfg` describes, for sequences of `input_shape` = [T] tokens from a vocabulary of `vocab_size`.

    Raises ValueError if T exceeds `cfg.context`.
    """
    sizes = GPTSizes(vocab_size=vocab_size, context=cfg.context, width=cfg.width, layers=cfg.layers,
                     heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, dropout=cfg.dropout)
    return GPT(sizes, input_shape, tie_embeddings=cfg.tie_embeddings,
               activation_checkpointing=cfg.activation_checkpointing)


def parameter_count(model: GPT, *, exclude_embeddings: bool = False) -> int:
    """Distinct parameters of `model` (a tied matrix counts once); with `exclude_embeddings`, without the token
    and position embedding tables (the Kaplan/Chinchilla "non-embedding" count; an untied head stays in)."""
    embed = model.embedding
    excluded = {id(embed.tokens.weight), id(embed.positions.weight)} if exclude_embeddings else set()
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)
