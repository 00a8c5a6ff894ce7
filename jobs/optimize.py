"""Compress a registry version into gated variants. `python -m jobs.optimize optimize=int8 optimize.source=production`

Each variant in `optimize.methods` is registered (alias = its method) only when its val accuracy is
within `optimize.tolerance` of its parent's; the report table is printed and written under the
storage root, and the last line is a JSON summary.
"""

import contextlib

import hydra

from orchestrator.config.schema import register_configs, to_config
from orchestrator.optimize.run import needs_ray, print_report, run_optimize
from orchestrator.flows import connected, print_summary

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)  # a bad override fails here, before Ray starts
    if not cfg.optimize.methods:
        raise SystemExit("optimize.methods is empty: choose some, e.g. optimize=int8 or optimize.methods=[int8_dynamic]")
    # Quantization alone runs in this process; pruning fine-tunes and distillation need Ray.
    with connected(cfg) if needs_ray(cfg.optimize) else contextlib.nullcontext():
        result = run_optimize(cfg)
    print_report(result)
    print_summary(result.summary())


if __name__ == "__main__":
    main()
