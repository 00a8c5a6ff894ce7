"""Serving latency and throughput under `wrk`: our endpoint (auth on, routing on) against plain
FastAPI + uvicorn serving the same weights, the Serve levers one by one, and wide MLPs where batching pays.

    flock /tmp/orc-ray.lock env PYTHONPATH=. .venv/bin/python bench/serve_latency.py     # about 8 minutes here
    flock /tmp/orc-ray.lock env PYTHONPATH=. .venv/bin/python bench/serve_latency.py --duration 3 --cold-starts 0

Needs `wrk` (Debian/Ubuntu: `apt-get install wrk`). Every point is one `wrk -t1 -c{1,32}` run of
`--duration` seconds (after `--warmup` seconds of the same load, not counted) POSTing the same v2
JSON body (one row, [1, 64] FP32) to /v2/models/<name>/infer; a Lua script sets the body and the
`Authorization: Bearer` header and reports p50/p99, requests, non-2xx responses and socket errors.
Before each point one request is checked: 200, and the same label from every server. Over each
point the script also reads the CPU time of the server process(es), of the proxy in front (HAProxy
or Serve's proxy actor), of wrk and of the whole machine, per request.

- **fastapi**: one uvicorn process (`torch.set_num_threads(1)`, access log off, the weights copied into
  its own memory) doing the same JSON in and out work with the project's own `parse_infer_request` /
  `encode_infer_response`, the model run inline in the handler. Measured with no Ray running.
- **ours**: `orchestrator.flows.connected` + `serve.deploy.run_deploy` (API key on, routing through the
  route table, the model run in the replica that parsed the request). Each Serve configuration runs in
  a child process of this script with its environment set, since Serve reads its flags when Ray
  starts: `default` (HAProxy + throughput-optimized mode, RAY_SERVE_HAPROXY_NBTHREAD=2, as
  `orchestrator.runtime.SERVE_ENV` sets), `python_proxy` (Serve's own proxy), `haproxy_plain` (HAProxy,
  throughput-optimized mode off), `nbthread1`; `default` also measures access log on, 2 replicas,
  `serve.batching=false` and the cold start of a min_replicas=0 deployment.
- **digits**: the default MLP ([128, 64], random weights); **wide**: MLP [1024] x 4 (3.2 M parameters);
  **wider**: MLP [2048] x 3 (8.5 M): big enough that a batch of 32 costs a few times one row, not 32 times.

Client, server and Ray's daemons share this machine's cores. Prints one line per point, two Markdown
tables, the goals of issue 16 with their outcome, and a last JSON line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import requests

SMALL = "digits"
WIDE = "wide"
WIDER = "wider"
HIDDEN: Dict[str, Optional[List[int]]] = {SMALL: None, WIDE: [1024] * 4, WIDER: [2048] * 3}
"""Each model's MLP widths (None: the default MLP): 22 k, 3.2 M and 8.5 M parameters."""
MODEL_POINTS = [(SMALL, 1), (SMALL, 32), (WIDE, 1), (WIDE, 32), (WIDER, 32)]
INPUT_SHAPE = [1, 8, 8]

LUA = textwrap.dedent("""
    -- One POST body (read from a file, so any bytes go), the key, and a JSON summary at the end.
    local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
    wrk.method = "POST"
    wrk.body = f:read("*a")
    f:close()
    wrk.headers["Content-Type"] = "application/json"
    local key = os.getenv("BENCH_KEY") or ""
    if key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end

    function done(summary, latency, requests)
      local e = summary.errors
      io.write(string.format(
        'WRK_JSON {"requests": %.0f, "duration_us": %.0f, "p50_us": %.1f, "p99_us": %.1f, "max_us": %.1f, '
        .. '"non_2xx": %.0f, "connect": %.0f, "read": %.0f, "write": %.0f, "timeout": %.0f}\\n',
        summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
        e.status, e.connect, e.read, e.write, e.timeout))
    end
""")

FASTAPI_APP = textwrap.dedent("""
    import sys, numpy as np, torch, uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
    from orchestrator.registry import ModelRegistry
    from orchestrator.registry.servable import build_servable
    from serve.protocol import BadRequest, encode_infer_response, parse_infer_request

    torch.set_num_threads(1)
    root, port, names = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    models = {}
    for name in names:
        version, arrays = ModelRegistry(root).load(name, 1)
        # In the process's own memory, as a plain server's torch.load leaves them.
        arrays = {key: np.array(value) for key, value in arrays.items()}
        models[name] = (build_servable(version.manifest, arrays), version.signature)
    app = FastAPI()

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request):
        if name not in models:
            return JSONResponse({"error": f"unknown model {name}"}, status_code=404)
        forward, signature = models[name]
        try:
            parsed = parse_infer_request(await request.body(), signature, max_rows=1024,
                                         header_length=request.headers.get("inference-header-content-length"))
        except BadRequest as err:
            return JSONResponse({"error": str(err)}, status_code=err.status)
        with torch.inference_mode():
            p = torch.softmax(forward(torch.from_numpy(parsed.inputs["input"])), dim=1).numpy()
        body, headers = encode_infer_response(model=name, version=1, request=parsed, signature=signature,
                                              outputs={"probabilities": p, "label": p.argmax(axis=1)})
        return Response(body, headers=headers)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
""")


# -- configurations ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Deployment:
    """One deploy inside a Serve configuration and the points measured on it."""

    label: str
    overrides: Dict[str, Any]
    points: List[Tuple[str, int]]
    """(model, concurrency)."""


@dataclass(frozen=True)
class ServeRun:
    """A Serve configuration: a fresh Ray in a child process with `env` set."""

    env: Dict[str, str]
    deployments: List[Deployment]
    cold_starts: bool = False


SMALL_POINTS = [(SMALL, 1), (SMALL, 32)]
ONE_REPLICA = {"serve.min_replicas": 1, "serve.max_replicas": 1}
SERVE_RUNS: Dict[str, ServeRun] = {
    "default": ServeRun(env={}, cold_starts=True, deployments=[
        Deployment("ours", ONE_REPLICA, MODEL_POINTS),
        Deployment("ours, 2 replicas", {"serve.min_replicas": 2, "serve.max_replicas": 2}, [(SMALL, 32), (WIDE, 32)]),
        Deployment("ours, access log on", {**ONE_REPLICA, "serve.access_log": True}, SMALL_POINTS),
        Deployment("ours, batching off", {**ONE_REPLICA, "serve.batching": False}, [(WIDE, 32), (WIDER, 32)]),
    ]),
    "python_proxy": ServeRun(
        env={"RAY_SERVE_ENABLE_HA_PROXY": "0", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
        deployments=[Deployment("ours, Serve's Python proxy", ONE_REPLICA, SMALL_POINTS)],
    ),
    "haproxy_plain": ServeRun(
        env={"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
        deployments=[Deployment("ours, HAProxy, throughput-optimized off", ONE_REPLICA, SMALL_POINTS)],
    ),
    "nbthread1": ServeRun(
        env={"RAY_SERVE_HAPROXY_NBTHREAD": "1"},
        deployments=[Deployment("ours, HAProxy nbthread 1", ONE_REPLICA, SMALL_POINTS)],
    ),
}


# -- load generation ---------------------------------------------------------------------------


@dataclass
class Bench:
    """Where the load goes from, and for how long."""

    workdir: str
    duration: int
    warmup: int
    body_path: str = field(init=False)
    lua_path: str = field(init=False)

    def __post_init__(self) -> None:
        self.body_path = os.path.join(self.workdir, "body.json")
        self.lua_path = os.path.join(self.workdir, "post.lua")


def find_wrk() -> str:
    path = shutil.which("wrk")
    if path is None:
        sys.exit("bench/serve_latency.py needs the wrk load generator: `apt-get install wrk` (Debian/Ubuntu), "
                 "or build it from https://github.com/wg/wrk and put it on PATH")
    return path


Processes = Dict[str, List[int]]
"""Pids by role ("server", "proxy"), whose CPU time a point charges to its requests."""


def cpu_seconds(processes: Processes) -> Dict[str, float]:
    """CPU seconds so far (user + system) of each process in `processes` (by "role:pid"; a process
    that has exited is left out), of this script's waited-for children (wrk, as "wrk") and of the
    whole machine (every process, other sessions' included, as "machine")."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for role, pids in processes.items():
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except FileNotFoundError:  # e.g. an HAProxy process handing over to its reloaded successor
                continue
            out[f"{role}:{pid}"] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["wrk"] = usage.ru_utime + usage.ru_stime
    with open("/proc/stat") as f:
        jiffies = [int(v) for v in f.readline().split()[1:]]
    out["machine"] = (sum(jiffies[:8]) - jiffies[3] - jiffies[4]) / tick  # all but idle and iowait
    return out


def cpu_ms_per_request(before: Dict[str, float], after: Dict[str, float], requests: float) -> Dict[str, float]:
    """CPU ms per request by role, over the processes alive at both ends."""
    totals: Dict[str, float] = {}
    for key in before.keys() & after.keys():
        role = key.split(":", 1)[0]
        totals[role] = totals.get(role, 0.0) + (after[key] - before[key]) * 1000 / max(requests, 1)
    return {role: totals[role] for role in sorted(totals, key=["server", "proxy", "wrk", "machine"].index)}


def wrk(bench: Bench, url: str, key: Optional[str], concurrency: int, seconds: int) -> Dict[str, float]:
    """One wrk run: latency percentiles (ms), req/s, non-2xx responses and socket errors."""
    command = [find_wrk(), "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "--timeout", "10s",
               "-s", bench.lua_path, url]
    env = {**os.environ, "BENCH_BODY": bench.body_path, "BENCH_KEY": key or ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("WRK_JSON ")]
    if not lines:
        raise RuntimeError(f"wrk printed no summary:\n{done.stdout}\n{done.stderr}")
    raw = json.loads(lines[-1][len("WRK_JSON "):])
    return {
        "p50_ms": raw["p50_us"] / 1000, "p99_ms": raw["p99_us"] / 1000, "max_ms": raw["max_us"] / 1000,
        "rps": raw["requests"] / (raw["duration_us"] / 1e6), "requests": raw["requests"],
        "non_2xx": raw["non_2xx"], "socket_errors": raw["connect"] + raw["read"] + raw["write"] + raw["timeout"],
        "loadavg": os.getloadavg()[0],
    }


def check_answer(bench: Bench, url: str, key: Optional[str]) -> int:
    """One request as wrk sends it; the label it answers. Raises unless it is a good v2 answer."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    with open(bench.body_path, "rb") as f:
        response = requests.post(url, data=f.read(), headers=headers, timeout=120)
    if response.status_code != 200:
        raise RuntimeError(f"{url}: {response.status_code} {response.text[:300]}")
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    if outputs["probabilities"]["shape"] != [1, 10]:
        raise RuntimeError(f"{url}: unexpected answer {response.text[:300]}")
    return int(outputs["label"]["data"][0])


def measure_point(bench: Bench, label: str, base_url: str, model: str, concurrency: int,
                  key: Optional[str], processes: Callable[[], Processes]) -> Dict[str, Any]:
    """One point: a checked request, the warm-up, then the measured wrk run, with the CPU time
    (ms per request) of the server, the proxy, wrk and the whole machine over that run."""
    url = f"{base_url}/v2/models/{model}/infer"
    answer = check_answer(bench, url, key)
    if bench.warmup:
        wrk(bench, url, key, concurrency, bench.warmup)
    before = cpu_seconds(processes())
    result: Dict[str, Any] = {**wrk(bench, url, key, concurrency, bench.duration), "label": answer}
    result["cpu_ms_per_request"] = cpu_ms_per_request(before, cpu_seconds(processes()), result["requests"])
    cpu = "  ".join(f"{role} {ms:.2f}" for role, ms in result["cpu_ms_per_request"].items())
    print(f"{label:<42} {model:<7} c={concurrency:<3} p50 {result['p50_ms']:8.2f} ms  p99 {result['p99_ms']:8.2f} ms  "
          f"{result['rps']:8.1f} req/s  non-2xx {result['non_2xx']:.0f}  socket errors {result['socket_errors']:.0f}  "
          f"CPU ms/request: {cpu}  (load {result['loadavg']:.1f}, {time.strftime('%H:%M:%S')})", flush=True)
    return result


# -- the registry and the baseline -------------------------------------------------------------


def register_models(root: str) -> None:
    """v1 of every model in HIDDEN with random weights, each 'production'."""
    import torch

    from orchestrator.config import ModelConfig, PipelineConfig, StorageConfig
    from orchestrator.training.models import build_model
    from tests.integration.serving_support import register

    for name, hidden in HIDDEN.items():
        model_cfg = ModelConfig() if hidden is None else ModelConfig(hidden=hidden)
        cfg = PipelineConfig(model=model_cfg, storage=StorageConfig(root=root))
        torch.manual_seed(0)
        register(cfg, build_model(cfg.model, INPUT_SHAPE, 10), name=name, alias="production")


def measure_fastapi(bench: Bench, root: str) -> Dict[str, Any]:
    from tests.support import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", FASTAPI_APP, root, str(port), *HIDDEN])
    try:
        wait_for_http(f"http://127.0.0.1:{port}/v2/models/{SMALL}/infer", proc)
        points: Dict[str, Dict[str, Any]] = {}
        for model, c in MODEL_POINTS:
            points.setdefault(model, {})[f"c{c}"] = measure_point(
                bench, "fastapi+uvicorn", f"http://127.0.0.1:{port}", model, c, None, lambda: {"server": [proc.pid]})
        return points
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def wait_for_http(url: str, proc: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the FastAPI process exited with {proc.returncode}")
        try:
            requests.get(url, timeout=5)
            return
        except requests.ConnectionError:
            time.sleep(0.3)
    raise TimeoutError(url)


# -- one Serve configuration (in a child process) ----------------------------------------------


def run_child(name: str, bench: Bench, root: str, cold_starts: int) -> Dict[str, Any]:
    """Every deployment of Serve configuration `name` on a fresh embedded Ray, one after the other."""
    from ray import serve

    from orchestrator.config import PipelineConfig, ServeConfig, StorageConfig, to_config
    from orchestrator.flows import connected
    from tests.support import free_port

    spec = SERVE_RUNS[name]
    base = PipelineConfig(storage=StorageConfig(root=root), serve=ServeConfig(port=free_port(), block=False))
    results: Dict[str, Any] = {"deployments": {}}
    with connected(base):
        results["serve_flags"] = serve_flags()
        results["listener"] = None
        for n, deployment in enumerate(spec.deployments):
            if n:
                serve.delete(base.serve.app_name)  # no replica of the previous deploy may answer this one's load
            results["deployments"][deployment.label] = measure_deployment(
                bench, to_config(base, deployment.overrides), deployment)
            if not n:
                results["listener"] = listener(base.serve.port)[0]
                print(f"{name}: port {base.serve.port} served by {results['listener']}; {results['serve_flags']}",
                      flush=True)
        if spec.cold_starts and cold_starts:
            results["cold_start_s"] = measure_cold_starts(base, bench, cold_starts)
    return results


def measure_deployment(bench: Bench, cfg, deployment: Deployment) -> Dict[str, Dict[str, Any]]:
    """Deploy `cfg`, wait for its replicas, measure the deployment's points: {model: {"c1": ...}}."""
    from serve.deploy import run_deploy

    deployed = run_deploy(cfg)
    wait_for_replicas(cfg.serve.app_name, cfg.serve.min_replicas)
    processes = functools.partial(serving_processes, replica_pids(cfg.serve.app_name, cfg.serve.min_replicas),
                                  cfg.serve.port)
    points: Dict[str, Dict[str, Any]] = {}
    for model, c in deployment.points:
        points.setdefault(model, {})[f"c{c}"] = measure_point(
            bench, deployment.label, deployed.base_url, model, c, deployed.api_key, processes)
    return points


def serving_processes(replicas: List[int], port: int) -> Processes:
    """The replicas and whatever listens on `port` now (HAProxy's pid changes when it reloads its config)."""
    return {"server": replicas, "proxy": listener(port)[1]}


def serve_flags() -> Dict[str, Any]:
    """The Serve flags as Ray's worker processes read them (this driver imported Serve before
    `ensure_ray` set them; the replicas, like this task, start from the raylet's environment)."""
    import ray

    @ray.remote(num_cpus=0)
    def read() -> Dict[str, Any]:
        from ray.serve._private import constants

        return {flag: getattr(constants, flag) for flag in (
            "RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED", "RAY_SERVE_ENABLE_DIRECT_INGRESS",
            "RAY_SERVE_HAPROXY_NBTHREAD", "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD", "RAY_SERVE_LOG_TO_STDERR",
        )}

    return ray.get(read.remote())


def listener(port: int) -> Tuple[str, List[int]]:
    """The name and pids of the processes listening on `port` (haproxy or Serve's proxy actor), from ss."""
    done = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True)
    names = re.findall(r'\("([^"]+)",pid=(\d+)', done.stdout)
    if not names:
        raise RuntimeError(f"nothing listens on port {port}: {done.stdout!r}")
    return names[0][0], sorted({int(pid) for _, pid in names})


def replica_pids(app: str, count: int, timeout_s: float = 60) -> List[int]:
    """Pids of the serving deployment's `count` live replicas, from Ray's state API (waiting for the
    replicas of a deleted deploy of the same app to exit)."""
    from ray.util.state import list_actors

    from serve.names import INGRESS_DEPLOYMENT

    deadline = time.monotonic() + timeout_s
    while True:
        actors = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{INGRESS_DEPLOYMENT}"),
                                      ("state", "=", "ALIVE")])
        pids = sorted(a.pid for a in actors if a.pid is not None)
        if len(pids) == count:
            return pids
        if time.monotonic() > deadline:
            raise TimeoutError(f"{INGRESS_DEPLOYMENT} has {len(pids)} live replica processes, expected {count}")
        time.sleep(0.5)


def wait_for_replicas(app: str, count: int, timeout_s: float = 120) -> None:
    """Until the serving deployment runs exactly `count` replicas and none is starting or stopping."""
    from ray import serve
    from ray.serve.schema import ReplicaState

    from serve.names import INGRESS_DEPLOYMENT

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = serve.status().applications[app].deployments[INGRESS_DEPLOYMENT].replica_states
        if states.get(ReplicaState.RUNNING, 0) == count and sum(states.values()) == count:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{INGRESS_DEPLOYMENT} did not reach {count} replicas")


def measure_cold_starts(base, bench: Bench, repeats: int) -> List[float]:
    """Seconds from a request to its answer while the serving deployment has scaled to zero."""
    from ray import serve

    from orchestrator.config import to_config
    from serve.deploy import run_deploy

    cfg = to_config(base, {"serve.min_replicas": 0, "serve.max_replicas": 1, "serve.downscale_delay_s": 1.0})
    serve.delete(cfg.serve.app_name)
    deployed = run_deploy(cfg)
    seconds = []
    for _ in range(repeats):
        wait_for_replicas(cfg.serve.app_name, 0)
        started = time.perf_counter()
        check_answer(bench, f"{deployed.endpoint}/infer", deployed.api_key)
        seconds.append(time.perf_counter() - started)
        print(f"cold start (min_replicas=0): {seconds[-1]:.2f} s", flush=True)
    return seconds


def spawn_child(name: str, args: argparse.Namespace, workdir: str, root: str) -> Dict[str, Any]:
    env = {**os.environ, **SERVE_RUNS[name].env}
    command = [sys.executable, os.path.abspath(__file__), "--child", name, "--workdir", workdir, "--root", root,
               "--duration", str(args.duration), "--warmup", str(args.warmup), "--cold-starts", str(args.cold_starts)]
    print(f"--- {name}: {SERVE_RUNS[name].env or 'orchestrator.runtime.SERVE_ENV as is'}", flush=True)
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    result: Optional[Dict[str, Any]] = None
    for line in proc.stdout:
        if line.startswith("CHILD_JSON "):
            result = json.loads(line[len("CHILD_JSON "):])
        else:
            print(line, end="", flush=True)
    if proc.wait() != 0 or result is None:
        raise RuntimeError(f"Serve configuration {name!r} failed (exit {proc.returncode})")
    return result


# -- report ------------------------------------------------------------------------------------


def table_rows(fastapi: Dict[str, Any], serve_runs: Dict[str, Any]) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(variant, model, {"c1": ..., "c32": ...}) for every variant measured."""
    rows = [("fastapi+uvicorn", model, fastapi[model]) for model in HIDDEN]
    for run in serve_runs.values():
        for label, points in run["deployments"].items():
            rows += [(label, model, by_c) for model, by_c in points.items()]
    return sorted(rows, key=lambda row: (list(HIDDEN).index(row[1]), row[0] != "fastapi+uvicorn"))


def markdown(rows: List[Tuple[str, str, Dict[str, Any]]], fastapi: Dict[str, Any]) -> str:
    columns = [("c1", "p50_ms", ".2f"), ("c1", "p99_ms", ".2f"), ("c1", "rps", ",.0f"),
               ("c32", "p50_ms", ".1f"), ("c32", "p99_ms", ".1f"), ("c32", "rps", ",.0f")]
    lines = ["| variant | model | c=1 p50 (ms) | c=1 p99 (ms) | c=1 req/s | c=32 p50 (ms) | c=32 p99 (ms) | c=32 req/s "
             "| c=32 req/s / FastAPI | non-2xx + socket errors |", "|" + "---|" * 10]
    for variant, model, by_c in rows:
        cells = [format(by_c[c][key], fmt) if c in by_c else "" for c, key, fmt in columns]
        ratio = f"{by_c['c32']['rps'] / fastapi[model]['c32']['rps']:.2f}" if "c32" in by_c else ""
        errors = sum(p["non_2xx"] + p["socket_errors"] for p in by_c.values())
        lines.append("| " + " | ".join([variant, model, *cells, ratio, f"{errors:.0f}"]) + " |")
    return "\n".join(lines)


def cpu_markdown(rows: List[Tuple[str, str, Dict[str, Any]]]) -> str:
    """CPU ms per request at c=32, by process: where a request's cost goes."""
    roles = ["server", "proxy", "wrk", "machine"]
    lines = ["| variant | model | c=32 CPU ms/request: server | proxy | wrk | whole machine |", "|" + "---|" * 6]
    for variant, model, by_c in rows:
        if "c32" in by_c:
            cpu = by_c["c32"]["cpu_ms_per_request"]
            lines.append("| " + " | ".join([variant, model, *(f"{cpu[r]:.2f}" if r in cpu else "" for r in roles)])
                         + " |")
    return "\n".join(lines)


def goals(fastapi: Dict[str, Any], serve_runs: Dict[str, Any]) -> Dict[str, Any]:
    """Issue 16's goals, each with the figures it was judged on."""
    ours = serve_runs["default"]["deployments"]
    one, two = ours["ours"], ours["ours, 2 replicas"]
    best_c32 = max(one[SMALL]["c32"]["rps"], two[SMALL]["c32"]["rps"])
    errors = sum(p["non_2xx"] + p["socket_errors"] for run in serve_runs.values()
                 for points in run["deployments"].values() for by_c in points.values() for p in by_c.values())
    outcome = {
        "p50_c1_ms": one[SMALL]["c1"]["p50_ms"], "p50_c1_at_most_1.5ms": one[SMALL]["c1"]["p50_ms"] <= 1.5,
        "c32_rps_over_fastapi_1_replica": one[SMALL]["c32"]["rps"] / fastapi[SMALL]["c32"]["rps"],
        "c32_rps_over_fastapi_best": best_c32 / fastapi[SMALL]["c32"]["rps"],
        "c32_at_least_0.7x": best_c32 / fastapi[SMALL]["c32"]["rps"] >= 0.7,
        "non_2xx_and_socket_errors_ours": errors, "zero_errors": errors == 0,
    }
    for model in (WIDE, WIDER):
        batched, theirs = one[model]["c32"], fastapi[model]["c32"]
        outcome |= {
            f"{model}_c32_rps_over_fastapi": batched["rps"] / theirs["rps"],
            f"{model}_c32_p99_over_fastapi": batched["p99_ms"] / theirs["p99_ms"],
            f"{model}_batched_beats_fastapi": batched["rps"] > theirs["rps"] and batched["p99_ms"] <= theirs["p99_ms"],
            f"{model}_c32_rps_batched_over_unbatched": batched["rps"] / ours["ours, batching off"][model]["c32"]["rps"],
        }
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per point")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of the same load before each point, not counted")
    parser.add_argument("--cold-starts", type=int, default=2, help="scale-from-zero measurements (0: none)")
    parser.add_argument("--child", choices=sorted(SERVE_RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    find_wrk()
    if args.child:
        bench = Bench(workdir=args.workdir, duration=args.duration, warmup=args.warmup)
        print("CHILD_JSON " + json.dumps(run_child(args.child, bench, args.root, args.cold_starts)), flush=True)
        return
    workdir = tempfile.mkdtemp(prefix="serve-bench-")
    try:
        run_all(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_all(args: argparse.Namespace, workdir: str) -> None:
    """The baseline, then every Serve configuration in its child; the tables, the goals, the JSON line."""
    from tests.support import infer_body

    started, load_start = time.monotonic(), os.getloadavg()[0]
    root = os.path.join(workdir, "store")
    bench = Bench(workdir=workdir, duration=args.duration, warmup=args.warmup)
    with open(bench.body_path, "w") as f:
        json.dump(infer_body(np.random.default_rng(0).random((1, 64), dtype=np.float32)), f)
    with open(bench.lua_path, "w") as f:
        f.write(LUA)
    register_models(root)
    fastapi = measure_fastapi(bench, root)
    serve_runs = {name: spawn_child(name, args, workdir, root) for name in SERVE_RUNS}
    rows = table_rows(fastapi, serve_runs)
    labels = {(variant, model): {p["label"] for p in by_c.values()} for variant, model, by_c in rows}
    for model in HIDDEN:
        if len({label for (_, m), found in labels.items() if m == model for label in found}) != 1:
            raise RuntimeError(f"the servers disagree on {model}'s label for the same body: {labels}")
    print(f"\n{markdown(rows, fastapi)}\n\n{cpu_markdown(rows)}\n")
    outcome = goals(fastapi, serve_runs)
    for goal, value in outcome.items():
        print(f"{goal:<40} {value:.3f}" if isinstance(value, float) else f"{goal:<40} {value}")
    print(json.dumps({
        "duration_s": args.duration, "fastapi": fastapi, "serve": serve_runs, "goals": outcome,
        "loadavg_start": load_start, "loadavg_end": os.getloadavg()[0], "wall_s": time.monotonic() - started,
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
