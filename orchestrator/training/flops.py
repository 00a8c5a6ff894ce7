"""FLOPs per token, the device's peak, and model FLOPs utilization (MFU).

MFU = achieved model FLOP/s / peak FLOP/s, where the model FLOPs are the ones the architecture needs
(PaLM, Chowdhery et al. 2022, appendix B): recomputation from activation checkpointing does not count.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, NamedTuple, Optional

import torch

if TYPE_CHECKING:
    from orchestrator.training.gpt import GPT


def transformer_flops_per_token(n_params: int, layers: int, heads: int, head_dim: int, context: int) -> float:
    """Training FLOPs (forward + backward) per token: 6N + 12·L·H·Q·T.

    6N counts the weight matmuls (2N forward, 4N backward); 12·L·H·Q·T the attention scores and their
    weighted sum over `context` = T positions in each of `layers` = L blocks of `heads` = H heads of size
    `head_dim` = Q (causal masking's saved half is not subtracted, as in PaLM). `n_params` = N should be
    the parameters that are multiplied per token: PaLM's and Chinchilla's non-embedding count, that is
    without the token and position embedding lookups (which cost no FLOPs), but with the output
    projection to the vocabulary even when it is tied to the token embedding, since that matmul is real.
    """
    return 6.0 * n_params + 12.0 * layers * heads * head_dim * context


def gpt_flops_per_token(model: GPT) -> float:
    """`transformer_flops_per_token` of `model`, at the sequence length it trains on (`model.input_shape`)."""
    from orchestrator.training.gpt import parameter_count

    sizes = model.sizes
    output_projection = sizes.width * sizes.vocab_size if model.tied else 0  # untied: already a non-embedding param
    n_params = parameter_count(model, exclude_embeddings=True) + output_projection
    return transformer_flops_per_token(n_params, sizes.layers, sizes.heads, sizes.head_dim, model.input_shape[0])


class PeakTflops(NamedTuple):
    """Dense (no 2:4 sparsity) peak TFLOP/s of one GPU, from its datasheet."""

    bf16: Optional[float]
    tf32: Optional[float]
    fp32: float


# Matched by substring of torch.cuda.get_device_name, in this order: a more specific name first
# (`H100 PCIe` before `H100`, `L40S` before `L4`). NVIDIA's datasheets quote sparse figures; these are half.
_PEAKS = (
    ("H200 NVL", PeakTflops(bf16=835.0, tf32=417.5, fp32=60.0)),
    ("H200", PeakTflops(bf16=989.5, tf32=494.7, fp32=67.0)),
    ("H100 NVL", PeakTflops(bf16=835.0, tf32=417.5, fp32=60.0)),
    ("H100 PCIe", PeakTflops(bf16=756.5, tf32=378.0, fp32=51.0)),
    ("H100", PeakTflops(bf16=989.5, tf32=494.7, fp32=67.0)),  # SXM (device names "H100 80GB HBM3", "H100 SXM5")
    ("A100", PeakTflops(bf16=312.0, tf32=156.0, fp32=19.5)),  # SXM and PCIe alike
    ("L40S", PeakTflops(bf16=362.05, tf32=183.0, fp32=91.6)),
    ("L40", PeakTflops(bf16=181.0, tf32=90.5, fp32=90.5)),
    ("L4", PeakTflops(bf16=121.0, tf32=60.0, fp32=30.3)),
    ("A10G", PeakTflops(bf16=125.0, tf32=62.5, fp32=31.2)),  # the A10 datasheet's figures
    ("V100-PCIE", PeakTflops(bf16=None, tf32=None, fp32=14.0)),  # Volta: no bf16 or TF32 tensor cores
    ("V100", PeakTflops(bf16=None, tf32=None, fp32=15.7)),
)


def peak_flops(device: torch.device, precision: str, override_tflops: float = 0.0) -> Optional[float]:
    """Peak dense FLOP/s of `device` for training in `precision` ('bf16' or 'fp32').

    `override_tflops` > 0 (train.peak_tflops) wins. Otherwise a known GPU's datasheet figure, fp32 being
    TF32 when torch lets matmuls use it. None for CPUs, unknown GPUs, and bf16 on GPUs without bf16 units:
    MFU is then not reported rather than reported against a guess.
    """
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    peak = lookup_peak(torch.cuda.get_device_name(device))
    if peak is None:
        return None
    precision = str(getattr(precision, "value", precision))
    if precision == "bf16":
        tflops = peak.bf16
    else:
        tflops = peak.tf32 if (peak.tf32 and torch.get_float32_matmul_precision() != "highest") else peak.fp32
    return None if tflops is None else tflops * 1e12


def lookup_peak(device_name: str) -> Optional[PeakTflops]:
    """The table row whose name occurs in `device_name` (case-insensitive), or None."""
    name = device_name.lower()
    return next((peak for key, peak in _PEAKS if key.lower() in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float]) -> Optional[float]:
    """Model FLOPs utilization in [0, 1] (None without a peak): tokens/s x FLOPs per token / peak FLOP/s."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak


def flop_counter() -> torch.utils.flop_counter.FlopCounterMode:
    """torch's FlopCounterMode, taught the CPU attention kernels it does not count by itself (PyTorch
    registers only the CUDA flash/efficient/cuDNN ones, so a CPU count would miss attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    cpu_kernels: Dict[Any, Any] = {
        aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _attention_backward_flops,
    }
    return FlopCounterMode(display=False, custom_mapping=cpu_kernels)


def _attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _attention_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)
