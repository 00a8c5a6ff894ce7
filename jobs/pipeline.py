"""data -> sweep -> register -> [optimize] -> deploy -> check. `python -m jobs.pipeline [overrides]`"""

from jobs._entry import Summary, hydra_job
from orchestrator.config import PipelineConfig
from orchestrator.flows import run_pipeline
from orchestrator.optimize.run import print_report


def run(cfg: PipelineConfig) -> Summary:
    result = run_pipeline(cfg)
    if result.optimize is not None:
        print_report(result.optimize)
    return result.summary()


main = hydra_job(run, serves=True)

if __name__ == "__main__":
    main()
