"""Wall time of the pipeline submitted to a local multi-node cluster against the same pipeline run locally.

  submitted  `ray job submit --working-dir . -- python -m jobs.pipeline ...` against a head with no
             CPUs and two 4-CPU worker nodes started by cluster/local_cluster.py (own network
             namespaces where the machine allows); timed from the submit command to its exit, so it
             counts packaging and uploading the working dir, the job's runtime env and its driver
  local      `python -m jobs.pipeline ...` on the embedded local Ray it starts itself (10 logical CPUs)

Both run the overrides of the e2e test (tests/e2e/test_cluster.py: 2 trials x 4 epochs, register,
deploy, one HTTP check), each on a fresh storage root. Starting the cluster is timed apart and not
counted. Run it under the machine's Ray lock, alone:

    flock /tmp/orch-ray.lock .venv/bin/python bench/cluster_submit.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

from cluster.local_cluster import ClusterSpec, start_cluster, stop_cluster, submit_job
from tests.e2e.test_cluster import PIPELINE
from tests.support import free_port, last_json_line, run_job


def time_submitted(repeats: int) -> dict:
    """Start a cluster, submit the pipeline `repeats` times (fresh storage root each), stop it."""
    directory = tempfile.mkdtemp(prefix="orc-", dir="/tmp")  # short: Ray's socket paths live under it
    started = time.perf_counter()
    cluster = start_cluster(directory, ClusterSpec(workers=2, head_cpus=0, worker_cpus=4))
    start_s = time.perf_counter() - started
    port = free_port()  # one port for every repeat: a running Serve keeps the one it started with
    host = "0.0.0.0" if cluster.mode == "netns" else "127.0.0.1"
    times = []
    try:
        for _ in range(repeats):
            with tempfile.TemporaryDirectory() as root:
                started = time.perf_counter()
                proc = submit_job(
                    cluster,
                    [
                        "python",
                        "-m",
                        "jobs.pipeline",
                        *PIPELINE,
                        f"serve.host={host}",
                        f"serve.port={port}",
                        f"storage.root=file://{root}",
                    ],
                )
                times.append(time.perf_counter() - started)
                _check(proc)
                print(f"submitted: {times[-1]:.1f} s", flush=True)
    finally:
        stop_cluster(directory)
        shutil.rmtree(directory, ignore_errors=True)
    return {"mode": cluster.mode, "cluster_start_s": round(start_s, 1), "submitted_s": [round(t, 1) for t in times]}


def time_local(repeats: int) -> list:
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as root:
            started = time.perf_counter()
            proc = run_job("pipeline", *PIPELINE, f"serve.port={free_port()}", f"storage.root=file://{root}")
            times.append(time.perf_counter() - started)
            _check(proc)
            print(f"local: {times[-1]:.1f} s", flush=True)
    return [round(t, 1) for t in times]


def _check(proc) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"pipeline failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    last_json_line(proc.stdout)  # raises when the run printed no summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant")
    args = parser.parse_args()
    result = time_submitted(args.repeats)
    result["local_s"] = time_local(args.repeats)
    result["ratio"] = round(statistics.median(result["submitted_s"]) / statistics.median(result["local_s"]), 2)
    print(
        f"submitted median {statistics.median(result['submitted_s']):.1f} s, "
        f"local median {statistics.median(result['local_s']):.1f} s, "
        f"ratio {result['ratio']} ({result['mode']} mode; cluster start {result['cluster_start_s']} s, not counted)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
