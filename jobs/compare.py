"""End-to-end against each layer-staged schedule, same data and epoch budget, over several seeds.
`python -m jobs.compare [overrides]`: writes compare.md/.csv/.png under the storage root and prints the table."""

import hydra

from orchestrator.training.compare import compare_schedules, run_compare
from orchestrator.config.schema import register_configs, to_config
from orchestrator.flows import connected, print_summary

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(dcfg) -> None:
    cfg = to_config(dcfg)
    compare_schedules(cfg)  # a schedule that cannot run on this model fails here, before Ray starts
    with connected(cfg):
        result = run_compare(cfg)
    print(result.markdown(), flush=True)
    print_summary({"compare": result.url, "rows": result.rows})


if __name__ == "__main__":
    main()
