"""Compression as a gated stage: int8 quantization, L1 pruning and knowledge distillation.

`run_optimize(cfg, ref)` makes the variants named in `cfg.optimize.methods` from a registry version,
evaluates each on the test split through the same code path that serves it
(`orchestrator.registry.servable.build_servable`), registers it as a variant of its parent only when its
accuracy drop is within `cfg.optimize.tolerance`, and writes a report (Markdown and CSV) under
`<storage root>/reports/optimize/`.

Modules: `quantize` (int8 modules to and from plain arrays), `prune` (L1 masks), `finetune` (the Ray
Train loop shared by the pruning fine-tune and distillation), `distill` (teacher outputs computed once
with Ray Data), `methods` (one small class per method), `gate`, `report`, `run`.

Names are imported on first use: a serving replica that only needs `quantize` never imports Ray Train.
"""

from orchestrator._lazy import lazy_exports

_EXPORTS = {
    "orchestrator.optimize.run": ["OptimizeResult", "run_optimize", "needs_ray"],
    "orchestrator.optimize.gate": ["AccuracyGate", "GateDecision"],
    "orchestrator.optimize.report": ["VariantReport"],
}
__all__, __getattr__, __dir__ = lazy_exports("orchestrator.optimize", _EXPORTS, globals())
