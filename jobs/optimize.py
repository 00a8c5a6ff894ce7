"""Compress a registry version into gated variants. `python -m jobs.optimize optimize=int8 optimize.source=production`

Each variant in `optimize.methods` is registered (alias = its method) only when its test accuracy is
within `optimize.tolerance` of its parent's; the report table is printed and written under the
storage root, and the last line is a JSON summary.
"""

from jobs._entry import Summary, hydra_job
from orchestrator.config import PipelineConfig
from orchestrator.optimize.run import needs_ray, print_report, run_optimize


def check(cfg: PipelineConfig) -> None:
    if not cfg.optimize.methods:
        raise SystemExit("optimize.methods is empty: choose some, "
                         "e.g. optimize=int8 or optimize.methods=[int8_dynamic]")


def run(cfg: PipelineConfig) -> Summary:
    result = run_optimize(cfg)
    print_report(result)
    return result.summary()


# Quantization alone runs in this process; pruning fine-tunes and distillation need Ray.
main = hydra_job(run, check=check, needs_ray=lambda cfg: needs_ray(cfg.optimize))

if __name__ == "__main__":
    main()
