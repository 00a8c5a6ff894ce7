"""Memory per serving replica for a model of about 200 MB: weights from the shared object-store copy
(orchestrator's V2Ingress, which runs the model in the replica that parsed the request) against each
replica loading the registry file itself.

    flock /tmp/orc-ray.lock env PYTHONPATH=. .venv/bin/python bench/replica_memory.py      # about 1.5 minutes here
    flock /tmp/orc-ray.lock env PYTHONPATH=. .venv/bin/python bench/replica_memory.py --replicas 3

The model is an MLP with hidden widths [8192, 6400] (53.0 M float32 parameters, 212 MB) and random
weights, registered once in a local registry. Three variants, each `replicas` replicas of 0.25 CPU that
load the model lazily, on their first call:

- **object store**: V2Ingress (`weights_info`), read-only views into the object-store copy;
- **registry mmap**: each replica calls `ModelRegistry.load`, which memory-maps the safetensors file
  of a local registry (the page cache is then shared by the replicas, as the object store is);
- **private copy**: the same, then copied into the replica's own memory, as every replica holds the
  weights when they come from a remote root (S3) or are encrypted (read and parsed in memory).

Each replica is measured before it has the model and again after it has built it with
`build_servable` and run one forward pass. For each replica process the script reads
/proc/<pid>/smaps_rollup: USS (Private_Clean + Private_Dirty, memory only that process holds) and
PSS (its proportional share of shared pages, such as the object store's shared memory or a file's
page cache). "model" is after - before: what holding the model costs a replica, apart from the rest
of the process (a V2Ingress replica also carries FastAPI, the protocol and the auth code, which the
bare baseline does not). Prints per-replica means and a last JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
from ray import serve
from ray.util.state import list_actors

from orchestrator.config import ModelConfig, PipelineConfig, ServeConfig, StorageConfig, to_dict
from orchestrator.flows import connected
from orchestrator.registry import ModelRegistry, signature_for
from orchestrator.registry.servable import build_servable
from orchestrator.training.models import build_model
from serve.deploy import run_deploy
from serve.names import INGRESS_DEPLOYMENT
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
    """The baselines: every replica reads and verifies the registry file itself (and, with
    `private`, copies the arrays into its own memory), on its first call, as V2Ingress loads a
    version on its first request."""

    def __init__(self, root: str, private: bool):
        torch.set_num_threads(1)
        self._root = root
        self._private = private
        self._forward: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self._arrays: Optional[Dict[str, np.ndarray]] = None
        self._loading = asyncio.Lock()

    def _load(self) -> Callable[[torch.Tensor], torch.Tensor]:
        version, arrays = ModelRegistry(self._root).load(MODEL, 1)
        self._arrays = {k: np.array(v) for k, v in arrays.items()} if self._private else arrays
        return build_servable(version.manifest, self._arrays)

    async def info(self, hold_s: float = 0.0) -> Dict[str, Union[int, str]]:
        import os

        async with self._loading:  # one load; off the loop, so the replica keeps answering Serve's probes
            if self._forward is None:
                self._forward = await asyncio.to_thread(self._load)
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


def replica_pids(app: str, deployment: str) -> List[int]:
    """Pids of the live replica processes of `deployment` in `app`, from Ray's state API."""
    actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])
    return sorted(a.pid for a in actors if a.pid is not None)


def load_on_every_replica(call, pids: List[int]) -> None:
    """Calls in bursts of held calls until every replica in `pids` has answered (so has the model):
    each call stays in flight a few seconds, so a burst fills one replica and reaches the others."""
    seen = set()
    for _ in range(5):
        for response in [call(hold_s=3.0) for _ in range(40)]:
            seen.add(response.result(timeout_s=300)["pid"])
        if seen >= set(pids):
            return
    raise RuntimeError(f"reached {len(seen & set(pids))} of {len(pids)} replicas")


def measure(pids: List[int]) -> Dict[str, float]:
    time.sleep(2)  # let freed load buffers settle
    rows = [smaps(pid) for pid in pids]
    return {k: float(np.mean([r[k] for r in rows])) for k in ("uss_mb", "pss_mb")}


def before_and_after(app: str, deployment: str, call, replicas: int) -> Dict[str, Dict[str, float]]:
    """Per-replica memory before the model is loaded, after, and the difference."""
    pids = replica_pids(app, deployment)
    if len(pids) != replicas:
        raise RuntimeError(f"{deployment} has {len(pids)} live replicas, expected {replicas}")
    before = measure(pids)
    load_on_every_replica(call, pids)
    after = measure(pids)
    return {"before": before, "after": after, "model": {k: after[k] - before[k] for k in after}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", type=int, default=2)
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="mem-bench-")
    try:
        cfg = PipelineConfig(
            model=ModelConfig(hidden=HIDDEN), storage=StorageConfig(root=root),
            serve=ServeConfig(port=free_port(), min_replicas=args.replicas, max_replicas=args.replicas, block=False),
        )
        size_mb = register_big_model(cfg)
        print(f"model: {size_mb:.0f} MB of float32 weights, {args.replicas} replicas per variant", flush=True)
        rows = measure_variants(cfg, args.replicas)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for name, row in rows.items():
        for when in ("before", "after", "model"):
            print(f"{name:<26} {when:<7} USS {row[when]['uss_mb']:7.1f} MB   PSS {row[when]['pss_mb']:7.1f} MB "
                  "per replica")
    print(json.dumps({"model_mb": size_mb, "replicas": args.replicas, "variants": rows}))


def measure_variants(cfg: PipelineConfig, replicas: int) -> Dict[str, Dict[str, Dict[str, float]]]:
    with connected(cfg):
        run_deploy(cfg)
        handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=cfg.serve.app_name)
        rows = {"object store (V2Ingress)": before_and_after(
            cfg.serve.app_name, INGRESS_DEPLOYMENT,
            lambda hold_s: handle.weights_info.remote(MODEL, 1, hold_s=hold_s), replicas,
        )}
        serve.delete(cfg.serve.app_name)
        for label, private in (("registry mmap", False), ("private copy", True)):
            rows[label] = baseline(cfg.storage.root, private, replicas)
        serve.shutdown()
    return rows


def baseline(root: str, private: bool, replicas: int) -> Dict[str, Dict[str, float]]:
    app = "private" if private else "mmap"
    handle = serve.run(
        # @serve.deployment returns a Deployment; ray types it as the class it wraps.
        PerReplicaLoad.options(num_replicas=replicas).bind(root, private),  # type: ignore[attr-defined]
        name=app, route_prefix=None,
    )
    try:
        return before_and_after(app, "PerReplicaLoad", lambda hold_s: handle.info.remote(hold_s=hold_s), replicas)
    finally:
        serve.delete(app)


if __name__ == "__main__":
    main()
