"""Memory per model replica for a model of about 200 MB: weights from the shared object-store copy
(orchestrator's ModelServer) against each replica loading the registry file itself.

    PYTHONPATH=. .venv/bin/python bench/replica_memory.py            # about 2 minutes here
    PYTHONPATH=. .venv/bin/python bench/replica_memory.py --replicas 3

The model is an MLP with hidden widths [8192, 6400] (53.0 M float32 parameters, 212 MB) and random
weights, registered once. Both variants run `replicas` replicas of 0.25 CPU, build the model with
`build_servable` and answer one forward pass before being measured. For each replica process the
script reads /proc/<pid>/smaps_rollup: USS (Private_Clean + Private_Dirty, memory only that process
holds) and PSS (its proportional share of shared pages; the object store's shared memory is split
between the processes mapping it). Prints per-replica means, ratios, and a last JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Dict, List, Union

import numpy as np
import torch
from ray import serve

from orchestrator.config import ModelConfig, PipelineConfig, ServeConfig, StorageConfig, to_dict
from orchestrator.flows import connected
from orchestrator.registry import ModelRegistry, signature_for
from orchestrator.registry.servable import build_servable
from orchestrator.training.models import build_model
from serve.deploy import run_deploy
from serve.names import MODEL_DEPLOYMENT, model_id
from tests.integration.serving_support import INPUT_SHAPE, MODEL
from tests.support import free_port

HIDDEN = [8192, 6400]


def smaps(pid: int) -> Dict[str, float]:
    """USS and PSS of a process, in MB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"uss_mb": fields["Private_Clean"] + fields["Private_Dirty"], "pss_mb": fields["Pss"]}


@serve.deployment(name="PerReplicaLoad", ray_actor_options={"num_cpus": 0.25})
class PerReplicaLoad:
    """The baseline: every replica reads and verifies the registry file and keeps its own arrays."""

    def __init__(self, root: str):
        torch.set_num_threads(1)
        version, arrays = ModelRegistry(root).load(MODEL, 1)
        self._forward = build_servable(version.manifest, arrays)
        self._arrays = arrays

    async def info(self, hold_s: float = 0.0) -> Dict[str, Union[int, str]]:
        import asyncio
        import os

        await asyncio.sleep(hold_s)
        with torch.inference_mode():
            self._forward(torch.zeros(1, 64))
        return {"pid": os.getpid(), "replica": serve.get_replica_context().replica_id.unique_id}


def register_big_model(cfg: PipelineConfig) -> float:
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in build_model(cfg.model, INPUT_SHAPE, 10).state_dict().items()}
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal(s, dtype=np.float32) * 0.01 for k, s in shapes.items()}
    ModelRegistry(cfg.storage.root).register(
        MODEL,
        weights,
        metrics={},
        config=to_dict(cfg),
        lineage={"source": "bench"},
        signature=signature_for(INPUT_SHAPE, 10),
    )
    ModelRegistry(cfg.storage.root).set_alias(MODEL, "production", 1)
    return sum(w.nbytes for w in weights.values()) / 2**20


def pids_of(handle, method: str, replicas: int) -> List[int]:
    """Pids of the `replicas` replicas behind `handle`. Calls go in bursts of held calls: the
    multiplexed router keeps a model's requests on the replica that has it loaded until it is full."""
    seen: Dict[str, int] = {}
    for _ in range(5):
        for response in [getattr(handle, method).remote(hold_s=3.0) for _ in range(40)]:
            info = response.result(timeout_s=300)
            seen[info["replica"]] = info["pid"]
        if len(seen) == replicas:
            return list(seen.values())
    raise RuntimeError(f"reached {len(seen)} of {replicas} replicas")


def measure(pids: List[int]) -> Dict[str, float]:
    time.sleep(2)  # let freed load buffers settle
    rows = [smaps(pid) for pid in pids]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("uss_mb", "pss_mb")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    cfg = PipelineConfig(
        model=ModelConfig(hidden=HIDDEN), storage=StorageConfig(root=tempfile.mkdtemp(prefix="mem-bench-")),
        serve=ServeConfig(port=free_port(), min_replicas=args.replicas, max_replicas=args.replicas, block=False),
    )
    size_mb = register_big_model(cfg)
    print(f"model: {size_mb:.0f} MB of float32 weights, {args.replicas} replicas per variant", flush=True)
    with connected(cfg):
        run_deploy(cfg)
        handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=cfg.serve.app_name).options(
            multiplexed_model_id=model_id(MODEL, 1)
        )
        shared = measure(pids_of(handle, "weights_info", args.replicas))
        serve.delete(cfg.serve.app_name)
        baseline_handle = serve.run(
            # @serve.deployment returns a Deployment; ray types it as the class it wraps.
            PerReplicaLoad.options(num_replicas=args.replicas).bind(cfg.storage.root),  # type: ignore[attr-defined]
            name="baseline",
            route_prefix=None,
        )
        own = measure(pids_of(baseline_handle, "info", args.replicas))
        serve.shutdown()
    for name, row in (("object store (shared)", shared), ("per-replica load", own)):
        print(f"{name:<24} USS {row['uss_mb']:7.1f} MB   PSS {row['pss_mb']:7.1f} MB per replica")
    ratios = {
        "uss_per_replica_load_over_shared": own["uss_mb"] / shared["uss_mb"],
        "pss_per_replica_load_over_shared": own["pss_mb"] / shared["pss_mb"],
    }
    print(
        f"per-replica load / shared: USS {ratios['uss_per_replica_load_over_shared']:.2f}x, "
        f"PSS {ratios['pss_per_replica_load_over_shared']:.2f}x"
    )
    print(
        json.dumps(
            {
                "model_mb": size_mb,
                "replicas": args.replicas,
                "shared": shared,
                "per_replica_load": own,
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
