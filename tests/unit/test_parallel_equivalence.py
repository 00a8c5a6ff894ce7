"""One optimizer step under FSDP (2 ranks) and under pipeline parallelism (2 ranks, GPipe and 1F1B)
leaves the same weights as single-process training on the same batch, within 1e-5.

Spawns two plain torch.distributed (gloo) processes: the plans are torch code, Ray only launches them.
"""

import pytest
import torch
import torch.multiprocessing as mp

from orchestrator.config import ParallelConfig, ParallelStrategy
from tests.support import free_port
from tests.unit import parallel_workers as workers


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("parallel") / "results.pt")
    mp.spawn(workers.run_rank, args=(2, free_port(), out), nprocs=2, join=True)
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("plan", ["fsdp", "pipeline-gpipe", "pipeline-1f1b"])
@pytest.mark.parametrize("kind,phase", workers.CASES)
def test_one_step_matches_single_process(distributed_results, plan, kind, phase):
    reference = workers.one_step(kind, phase, ParallelConfig(strategy=ParallelStrategy.ddp), slice(None))
    before = workers.one_step(
        kind, phase, ParallelConfig(strategy=ParallelStrategy.ddp), slice(0, 0)
    )  # a step on no rows: initial weights
    _assert_same_step(distributed_results[(plan, kind, phase)], reference, before, f"{plan} {kind}[{phase}]")


@pytest.mark.parametrize("plan,tied", [("gpt-fsdp", True), ("gpt-pipeline-1f1b", False)])
@pytest.mark.parametrize("kind,phase", workers.GPT_CASES)
def test_gpt_one_step_matches_single_process(distributed_results, plan, tied, kind, phase):
    """The GPT under FSDP2 (tied embeddings stay in the root unit) and under a 1F1B pipeline (untied: the
    embedding and the head sit on different ranks), with the causal-LM loss, padding, clipping: fp32 within 1e-5."""
    single = ParallelConfig(strategy=ParallelStrategy.ddp)
    reference = workers.gpt_one_step(kind, phase, single, slice(None), tied=tied)
    before = workers.gpt_one_step(kind, phase, single, slice(0, 0), tied=tied)
    _assert_same_step(distributed_results[(plan, kind, phase)], reference, before, f"{plan} {kind}[{phase}]")


def _assert_same_step(got, reference, before, label: str) -> None:
    """`got` holds the weights `reference` holds (within 1e-5), and the step moved some weight from `before`."""
    assert got.keys() == reference.keys()
    moved = [k for k in reference if not torch.equal(reference[k], before[k])]
    assert moved, "the step changed no weight: the comparison would prove nothing"
    for name in reference:
        torch.testing.assert_close(got[name], reference[name], atol=1e-5, rtol=0, msg=f"{label} {name}")
