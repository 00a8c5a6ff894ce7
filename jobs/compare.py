"""End-to-end against each layer-staged schedule, same data and epoch budget, over several seeds.
`python -m jobs.compare [overrides]`: writes compare.md/.csv/.png under the storage root and prints the table."""

from jobs._entry import Summary, hydra_job
from orchestrator.config import PipelineConfig
from orchestrator.training.compare import compare_variants, run_compare


def run(cfg: PipelineConfig) -> Summary:
    result = run_compare(cfg)
    print(result.markdown(), flush=True)
    return {"compare": result.url, "rows": result.rows}


# A schedule that cannot run on this model fails in compare_variants, before Ray starts.
main = hydra_job(run, check=compare_variants)

if __name__ == "__main__":
    main()
