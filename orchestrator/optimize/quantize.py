"""int8 quantization with torch's eager-mode API (torch.ao.quantization), stored as plain arrays.

Two methods:
  int8_dynamic  Linear weights in int8, activations quantized on the fly per batch (no calibration).
                Convolutions stay float (dynamic quantization has no conv kernels).
  int8_static   weights and activations in int8; activation ranges calibrated on training rows;
                Linear/Conv + ReLU pairs fused first so the ReLU runs inside the int8 kernel.

A quantized module keeps its weights as packed, engine-specific objects that `np.savez` cannot hold.
`int8_arrays` turns every quantized weight into an int8 array plus its scales, zero points and
channel axis (plain arrays, loadable with allow_pickle=False), and `int8_model` rebuilds the module
from those arrays: the structure comes from the manifest's config and method, the values from the
arrays. A replica therefore repacks its own int8 copy (a quarter of the float size) instead of
viewing the shared object-store arrays.

torch 2.13 marks torch.ao.quantization deprecated in favour of torchao; the eager API still works on
this CPU wheel, so its warnings are silenced where it is called. torchao is not used, measured rather
than assumed: torchao 0.18.0 (the first release built for torch >= 2.11) imports on torch 2.13 CPU and
its `quantize_(model, Int8DynamicActivationInt8WeightConfig())` keeps the digits MLP's accuracy, but in
eager mode (how replicas serve) it runs aten::_int_mm behind a tensor subclass at about 10x this
module's latency and slower than the float model (512x256 MLP, one thread: 0.60 ms at batch 1 against
0.059 ms here and 0.049 ms float). torch.compile brings it to 0.10 ms after a 26 s compile per process,
still slower than here, and its PT2E flow (X86InductorQuantizer) likewise needs torch.compile. Its
static config quantizes Linear only (no Conv2d, which int8_static covers), and importing it adds ~3 s
to a replica's start.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Dict, Iterator, Optional

import numpy as np
import torch
from torch import nn

INT8_METHODS = ("int8_dynamic", "int8_static")
_PER_TENSOR = -1
"""Stored channel axis of a per-tensor quantized weight."""


@contextlib.contextmanager
def quantization_api(backend: str) -> Iterator[None]:
    """Run torch.ao.quantization on `backend` (x86, fbgemm, qnnpack) with its deprecation warnings silenced."""
    if backend not in torch.backends.quantized.supported_engines:
        raise ValueError(f"optimize.quantize.backend {backend!r} is not supported by this torch build "
                         f"(supported: {torch.backends.quantized.supported_engines})")
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = backend
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
            warnings.filterwarnings("ignore", message=".*must run observer before calling calculate_qparams.*")
            warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
            yield
    finally:
        torch.backends.quantized.engine = previous


def quantize(model: nn.Module, method: str, backend: str, calibration: Optional[torch.Tensor] = None) -> nn.Module:
    """An int8 copy of float `model` (left untouched). `calibration` rows are required for int8_static."""
    import torch.ao.quantization as tq

    model = copy.deepcopy(model).eval()
    with quantization_api(backend):
        if method == "int8_dynamic":
            return tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
        if method != "int8_static":
            raise ValueError(f"not an int8 method: {method!r} (expected one of {list(INT8_METHODS)})")
        if calibration is None:
            raise ValueError("int8_static needs calibration rows")
        prepared = _prepare_static(model, backend)
        with torch.no_grad():
            prepared(calibration)
        return tq.convert(prepared)


def _prepare_static(model: nn.Module, backend: str) -> nn.Module:
    import torch.ao.quantization as tq

    _fuse_relus(model)
    # QuantWrapper quantizes the float input and dequantizes the logits, so callers keep float tensors.
    wrapped = tq.QuantWrapper(model)
    wrapped.qconfig = tq.get_default_qconfig(backend)
    return tq.prepare(wrapped)


def _fuse_relus(model: nn.Module) -> None:
    """Fuse every (Linear|Conv2d, ReLU) pair of adjacent children, in place."""
    import torch.ao.quantization as tq

    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        children = list(sequential.named_children())
        pairs = [[a, b] for (a, ma), (b, mb) in zip(children, children[1:])
                 if isinstance(ma, (nn.Linear, nn.Conv2d)) and isinstance(mb, nn.ReLU)]
        if pairs:
            tq.fuse_modules(sequential, pairs, inplace=True)


def _quantized_weight_modules(model: nn.Module) -> Iterator[tuple]:
    # Quantized Linear/Conv (dynamic, static, fused) hold packed weights behind weight()/set_weight_bias.
    for name, module in model.named_modules():
        if hasattr(module, "set_weight_bias") and callable(getattr(module, "weight", None)):
            yield name, module


def int8_arrays(qmodel: nn.Module) -> Dict[str, np.ndarray]:
    """Plain arrays holding every value of quantized `qmodel` (see the module docstring)."""
    out: Dict[str, np.ndarray] = {}
    for name, module in _quantized_weight_modules(qmodel):
        weight, bias = module.weight(), module.bias()
        out.update(_qtensor_arrays(f"{name}.weight", weight))
        if bias is not None:
            out[f"{name}.bias"] = bias.detach().numpy().astype(np.float32)
        # Output quantization of static modules (dynamic ones carry unused defaults; kept for uniformity).
        out[f"{name}.scale"] = np.asarray(float(module.scale), dtype=np.float64)
        out[f"{name}.zero_point"] = np.asarray(int(module.zero_point), dtype=np.int64)
    for name, tensor in [*qmodel.named_parameters(), *qmodel.named_buffers()]:
        out[name] = tensor.detach().numpy().copy()  # float layers left as they were, QuantStub scale
    return out


def _qtensor_arrays(prefix: str, weight: torch.Tensor) -> Dict[str, np.ndarray]:
    if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        scale, zero_point = weight.q_per_channel_scales(), weight.q_per_channel_zero_points()
        axis = weight.q_per_channel_axis()
    else:
        scale, zero_point, axis = torch.tensor(weight.q_scale()), torch.tensor(weight.q_zero_point()), _PER_TENSOR
    return {
        f"{prefix}.int8": weight.int_repr().numpy().copy(),
        f"{prefix}.scale": scale.numpy().astype(np.float64),
        f"{prefix}.zero_point": zero_point.numpy().astype(np.int64),
        f"{prefix}.axis": np.asarray(axis, dtype=np.int64),
    }


def _qtensor(arrays: Dict[str, np.ndarray], prefix: str) -> torch.Tensor:
    """The quantized tensor stored under `prefix` by `_qtensor_arrays` (exactly: same int8 values)."""
    ints = torch.from_numpy(np.array(arrays[f"{prefix}.int8"])).to(torch.float64)
    scale = torch.from_numpy(np.array(arrays[f"{prefix}.scale"], dtype=np.float64))
    zero_point = torch.from_numpy(np.array(arrays[f"{prefix}.zero_point"], dtype=np.int64))
    axis = int(_scalar(arrays[f"{prefix}.axis"]))
    if axis == _PER_TENSOR:
        one_scale, one_zero = _scalar(scale.numpy()), int(_scalar(zero_point.numpy()))
        return torch.quantize_per_tensor(((ints - one_zero) * one_scale).float(), one_scale, one_zero, torch.qint8)
    view = [-1 if d == axis else 1 for d in range(ints.dim())]
    values = (ints - zero_point.view(view)) * scale.view(view)
    return torch.quantize_per_channel(values.float(), scale, zero_point, axis, torch.qint8)


def _scalar(array: np.ndarray):
    # The registry stores scalars as 1-element arrays (np.ascontiguousarray makes 0-d arrays 1-d).
    return np.asarray(array).reshape(-1)[0].item()


def load_int8_arrays(qmodel: nn.Module, arrays: Dict[str, np.ndarray]) -> None:
    """Put `arrays` (from `int8_arrays`) into a quantized module of the same structure.

    Raises ValueError when the arrays and the module's slots do not match one to one.
    """
    used = set()
    for name, module in _quantized_weight_modules(qmodel):
        bias_key = f"{name}.bias"
        bias = torch.from_numpy(np.array(arrays[bias_key])) if bias_key in arrays else None
        module.set_weight_bias(_qtensor(arrays, f"{name}.weight"), bias)
        module.scale = float(_scalar(arrays[f"{name}.scale"]))
        module.zero_point = int(_scalar(arrays[f"{name}.zero_point"]))
        used |= {f"{name}.weight.{part}" for part in ("int8", "scale", "zero_point", "axis")}
        used |= {bias_key, f"{name}.scale", f"{name}.zero_point"} & set(arrays)
    with torch.no_grad():
        for name, tensor in [*qmodel.named_parameters(), *qmodel.named_buffers()]:
            tensor.copy_(torch.from_numpy(np.array(arrays[name])))
            used.add(name)
    if used != set(arrays):
        raise ValueError(
            f"int8 weights do not fit the model: missing {sorted(used - set(arrays))}, "
            f"unexpected {sorted(set(arrays) - used)}"
        )


def int8_model(manifest: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> nn.Module:
    """The quantized module of an int8 variant's `manifest`, holding `arrays`.

    The structure is rebuilt the way `quantize` made it, from a float model of the recorded
    architecture (its random initial values are all overwritten); static quantization is prepared
    and converted on one row of zeros, whose ranges are then replaced by the stored ones.
    """
    from orchestrator.config import to_config
    from orchestrator.training.models import build_model

    variant, signature = manifest["variant"], manifest["signature"]
    float_model = build_model(to_config(manifest["config"]).model, signature["input_shape"], signature["num_classes"])
    features = int(np.prod(signature["input_shape"]))
    calibration = torch.zeros(1, features) if variant["method"] == "int8_static" else None
    qmodel = quantize(float_model, variant["method"], variant["backend"], calibration)
    with quantization_api(variant["backend"]):
        load_int8_arrays(qmodel, arrays)
    return qmodel.eval()


def int8_parameter_values(arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """Each weight and bias of an int8 variant as numbers whose zeros are the model's zeros
    (int8 weights minus their zero point), for parameter and non-zero counts."""
    out = {}
    for key, value in arrays.items():
        if key.endswith(".weight.int8"):
            prefix = key[: -len(".int8")]
            zero_point, axis = arrays[f"{prefix}.zero_point"], int(_scalar(arrays[f"{prefix}.axis"]))
            view = [-1 if d == axis else 1 for d in range(value.ndim)]
            out[prefix] = value.astype(np.int64) - (zero_point if axis == _PER_TENSOR else zero_point.reshape(view))
        elif not _is_quantization_metadata(key):
            out[key] = value
    return out


def _is_quantization_metadata(key: str) -> bool:
    # Weight scales, zero points and axes, output ranges and the QuantStub's range: not parameters.
    return key.endswith(".weight.axis") or key.rpartition(".")[2] in ("scale", "zero_point")
