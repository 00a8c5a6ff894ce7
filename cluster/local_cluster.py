"""A local multi-node Ray cluster: one head and N worker nodes, each its own "host" where the machine allows.

With root and `ip netns`, every node runs in a network namespace of its own, with its own address on
a private bridge, so a node can be killed whole (host loss) or cut off; elsewhere the nodes are plain
processes on 127.0.0.1. Token auth is on with a token generated for this cluster, every port is
explicit and outside Ray's default worker range, and a state file records what was started, so `stop`
stops exactly that and nothing else.

    python -m cluster.local_cluster start --dir /tmp/orc-demo --workers 2
    python -m cluster.local_cluster status --dir /tmp/orc-demo
    eval "$(python -m cluster.local_cluster env --dir /tmp/orc-demo)"   # token + dashboard for `ray job`, `serve`
    python -m cluster.local_cluster exec --dir /tmp/orc-demo -- python -m jobs.train   # on the head host
    python -m cluster.local_cluster kill-node worker1 --dir /tmp/orc-demo      # SIGKILL the whole node
    python -m cluster.local_cluster restart-node worker1 --dir /tmp/orc-demo
    python -m cluster.local_cluster add-node --dir /tmp/orc-demo
    python -m cluster.local_cluster stop --dir /tmp/orc-demo
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from orchestrator.config import require
from orchestrator.runtime import RAY_ENV

REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "cluster.json"
TOKEN_FILE = "auth_token"
MARKER = "ORC_LOCAL_NODE"
"""Environment variable every process of a node inherits (`<cluster>/<node>`): how a node's processes are found."""
MODES = ("auto", "netns", "local")
PORTS_PER_NODE = 300
"""Each node owns [base + index * 300, base + index * 300 + 300): its service ports, then its worker ports."""
SERVICE_PORTS = {
    # `ray start` flags, every node
    "node-manager-port": 3, "object-manager-port": 4, "metrics-export-port": 5,
    "dashboard-agent-listen-port": 6, "dashboard-agent-grpc-port": 7, "runtime-env-agent-port": 8,
    # `ray start` flags, head only
    "port": 0, "dashboard-port": 1, "ray-client-server-port": 2,
    # head only, set through the environment: Ray's defaults (44227, 44217) are fixed and bind 0.0.0.0
    "DASHBOARD_METRIC_PORT": 9, "AUTOSCALER_METRIC_PORT": 10,
}
"""Offset of each service port in a node's block."""
HEAD_ONLY = ("port", "dashboard-port", "ray-client-server-port", "DASHBOARD_METRIC_PORT", "AUTOSCALER_METRIC_PORT")
WORKER_PORTS = (100, PORTS_PER_NODE - 1)
"""Offsets of the first and last port of the node's Ray worker processes (one port each)."""
# Below Linux's ephemeral range (32768+), where an outgoing connection could hold a port first, and
# above Ray's default worker ports (10002-19999), which other Ray instances on the machine use.
PORT_RANGE = (21000, 32000)


@dataclass(kw_only=True)
class ClusterSpec:
    """What `start_cluster` builds."""

    workers: int = 2
    """Worker nodes besides the head."""
    head_cpus: int = 0
    """Logical CPUs of the head. 0 keeps training workers, trials, Ray Data tasks and replicas on the
    worker nodes; the head runs the GCS, dashboard, job drivers and Serve's controller and proxy."""
    worker_cpus: int = 4
    """Logical CPUs of each worker node (may exceed the machine's cores: they are only scheduling units)."""
    object_store_mb: int = 300
    """Object store size of each node."""
    base_port: int = 0
    """First port of the cluster's block (PORTS_PER_NODE per node); 0 picks a free block."""
    mode: str = "auto"
    """'netns' (each node in its own network namespace; needs root), 'local' (processes on
    127.0.0.1) or 'auto' (netns where it works)."""
    dead_node_after_s: int = 3
    """The GCS declares a node dead after this many seconds of failed health checks (one a second).
    Ray's default is 15 s (5 failures, 3 s apart); a dead host is found sooner and its work restarts
    sooner. A host that is alive but slow still gets Ray's 10 s per check before a check fails."""

    def __post_init__(self) -> None:
        require(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        require(self.head_cpus >= 0, "head_cpus", f"must be >= 0, got {self.head_cpus}")
        require(self.worker_cpus >= 1, "worker_cpus", f"must be >= 1, got {self.worker_cpus}")
        require(
            self.object_store_mb >= 80, "object_store_mb", f"must be >= 80 (Ray's minimum), got {self.object_store_mb}"
        )
        require(
            self.base_port == 0 or 1024 < self.base_port < 65000,
            "base_port",
            f"must be 0 or in 1025..64999, got {self.base_port}",
        )
        require(self.mode in MODES, "mode", f"must be one of {MODES}, got {self.mode!r}")
        require(self.dead_node_after_s >= 1, "dead_node_after_s", f"must be >= 1, got {self.dead_node_after_s}")


@dataclass(kw_only=True)
class Node:
    """One node as started: its address, namespace and supervising process."""

    name: str
    """'head', 'worker1', 'worker2', ..."""
    index: int
    """0 for the head; picks the node's address and port block."""
    ip: str
    num_cpus: int
    netns: str = ""
    """Network namespace ('' in local mode)."""
    veth: str = ""
    """Host side of the node's veth pair ('' in local mode): `ip link set <veth> down` cuts the node off."""
    pid: int = 0
    """The node's `ray start --block` process (0 when it is not running)."""

    @property
    def resource(self) -> str:
        """A custom resource only this node has (one unit), to place work on it."""
        return f"orc_{self.name}"


@dataclass(kw_only=True)
class LocalCluster:
    """A started cluster, as recorded in `<dir>/cluster.json`."""

    dir: str
    name: str
    """Unique prefix of everything this cluster creates (namespaces, links, process markers)."""
    mode: str
    """'netns' or 'local'."""
    base_port: int
    object_store_mb: int
    worker_cpus: int
    dead_node_after_s: int = 3
    subnet: str = ""
    """First three octets of the nodes' /24 ('' in local mode); the bridge holds .1."""
    bridge: str = ""
    nodes: Dict[str, Node] = field(default_factory=dict)

    @property
    def head(self) -> Node:
        return self.nodes["head"]

    @property
    def gcs_address(self) -> str:
        return f"{self.head.ip}:{self.base_port + SERVICE_PORTS['port']}"

    @property
    def dashboard_url(self) -> str:
        """Dashboard and Jobs API (`ray job submit --address`)."""
        return f"http://{self.head.ip}:{self.base_port + SERVICE_PORTS['dashboard-port']}"

    @property
    def token_path(self) -> str:
        return os.path.join(self.dir, TOKEN_FILE)

    def client_env(self) -> Dict[str, str]:
        """Variables a client on this machine needs: the token, and the dashboard as the default address
        of `ray job ...` (RAY_API_SERVER_ADDRESS) and `serve ...` (RAY_DASHBOARD_ADDRESS)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                "RAY_API_SERVER_ADDRESS": self.dashboard_url, "RAY_DASHBOARD_ADDRESS": self.dashboard_url}

    def save(self) -> None:
        path = os.path.join(self.dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(asdict(self), f, indent=2)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, directory: str) -> Optional[LocalCluster]:
        """The cluster recorded in `directory`, or None when there is none."""
        try:
            with open(os.path.join(directory, STATE_FILE)) as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        data["nodes"] = {name: Node(**node) for name, node in data["nodes"].items()}
        return cls(**data)


def start_cluster(directory: str, spec: Optional[ClusterSpec] = None) -> LocalCluster:
    """Start a head and `spec.workers` worker nodes; return once every node is alive in the GCS.

    `directory` holds the state file, the token, per-node temp dirs and logs; keep its path short
    (Ray's Unix sockets live under it, and their paths must stay under 108 bytes). Raises
    RuntimeError if a cluster is already recorded there or a node fails to come up; a failed start
    stops whatever it had started.
    """
    spec = spec or ClusterSpec()
    directory = os.path.abspath(directory)
    if LocalCluster.load(directory) is not None:
        raise RuntimeError(f"a cluster is already recorded in {directory}: stop it first")
    os.makedirs(directory, exist_ok=True)
    mode = spec.mode if spec.mode != "auto" else ("netns" if _netns_works() else "local")
    name = f"orc{secrets.token_hex(3)}"
    cluster = LocalCluster(
        dir=directory,
        name=name,
        mode=mode,
        base_port=spec.base_port or _free_port_block(spec.workers + 1),
        object_store_mb=spec.object_store_mb,
        worker_cpus=spec.worker_cpus,
        dead_node_after_s=spec.dead_node_after_s,
    )
    _write_token(cluster.token_path)
    try:
        if mode == "netns":
            _create_bridge(cluster)
        _start_node(cluster, _new_node(cluster, "head", 0, spec.head_cpus))
        for index in range(1, spec.workers + 1):
            _start_node(cluster, _new_node(cluster, f"worker{index}", index, spec.worker_cpus))
    except BaseException:
        stop_cluster(directory)
        raise
    return cluster


def stop_cluster(directory: str) -> bool:
    """SIGKILL every process of the cluster recorded in `directory`, remove its namespaces and links.

    Idempotent, and safe on a half-started cluster. Returns False when nothing was recorded there.
    """
    cluster = LocalCluster.load(os.path.abspath(directory))
    if cluster is None:
        return False
    for node in sorted(cluster.nodes.values(), key=lambda n: -n.index):  # workers first: the head outlives them
        _kill_processes(cluster, node)
        if node.netns:
            _ip("netns", "del", node.netns, check=False)
        if node.veth:
            _ip("link", "del", node.veth, check=False)  # gone with its namespace already, unless that failed
    if cluster.bridge:
        _ip("link", "del", cluster.bridge, check=False)
    os.remove(os.path.join(cluster.dir, STATE_FILE))
    return True


def kill_node(cluster: LocalCluster, name: str) -> List[int]:
    """Host loss: SIGKILL every process of node `name` at once (its raylet, object store, workers,
    and on the head the GCS, dashboard and job drivers). Returns the pids killed."""
    node = _node(cluster, name)
    killed = _kill_processes(cluster, node)
    node.pid = 0
    cluster.save()
    return killed


def restart_node(cluster: LocalCluster, name: str) -> Node:
    """Start node `name` again with its address, ports and resources (killing what is left of it first).

    The restarted raylet joins as a new node id. Restarting the head starts a new, empty GCS.
    """
    node = _node(cluster, name)
    _kill_processes(cluster, node)
    _start_node(cluster, node)
    return node


def add_node(cluster: LocalCluster, num_cpus: int = 0) -> Node:
    """Start one more worker node (`num_cpus` 0: the cluster's worker_cpus)."""
    index = max(node.index for node in cluster.nodes.values()) + 1
    node = _new_node(cluster, f"worker{index}", index, num_cpus or cluster.worker_cpus)
    _start_node(cluster, node)
    return node


def node_pids(cluster: LocalCluster, name: str) -> List[int]:
    """Live processes of node `name`: every process in its network namespace (netns mode), or those
    whose environment carries the node's marker, with their descendants.

    Ray passes its environment on to the GCS, dashboard, raylet and every worker, so the marker finds a
    local-mode node without trusting parent links (Ray daemonizes some processes); descendants count
    too because a few processes (the dashboard's forkserver children) write their title over it.
    """
    node = _node(cluster, name)
    if node.netns:
        return sorted(int(pid) for pid in _ip("netns", "pids", node.netns, check=False).stdout.split())
    marker = f"{MARKER}={cluster.name}/{name}".encode()
    parents = _live_parents()
    found = {pid for pid in parents if marker in _environ(pid)}
    while more := {pid for pid, parent in parents.items() if parent in found} - found:
        found |= more
    return sorted(found)


def _live_parents() -> Dict[int, int]:
    """pid -> parent pid of every process that is not a zombie."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # the name before ')' may hold spaces
        except OSError:  # gone meanwhile
            continue
        if fields[0] != "Z":
            parents[int(entry.name)] = int(fields[1])
    return parents


def _environ(pid: int) -> List[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return f.read().split(b"\0")
    except OSError:  # gone meanwhile, or not ours to read
        return []


def host_command(cluster: LocalCluster, argv: List[str], node: str = "head") -> List[str]:
    """`argv` wrapped to run on `node`'s host: inside its network namespace in netns mode."""
    netns = _node(cluster, node).netns
    return ["ip", "netns", "exec", netns, *argv] if netns else list(argv)


def node_env(cluster: LocalCluster, node: str = "head") -> Dict[str, str]:
    """Environment of a process on `node`'s host: this project's venv first on PATH, the repo on
    PYTHONPATH, the cluster's token, RAY_ADDRESS naming the GCS, and the node's marker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    venv_bin = os.path.dirname(sys.executable)
    env.update(
        RAY_ENV,  # what orchestrator.runtime gives an embedded Ray: the cluster behaves the same
        PATH=os.pathsep.join([venv_bin, env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        RAY_ADDRESS=cluster.gcs_address, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
        **{MARKER: f"{cluster.name}/{node}"}, **cluster.client_env(),
        **{name: str(port) for name, port in node_ports(cluster, _node(cluster, node)).items() if name.isupper()},
    )
    return env


def node_ports(cluster: LocalCluster, node: Node) -> Dict[str, int]:
    """Every port `node` listens on, by `ray start` flag (or environment variable), from its own block."""
    first = cluster.base_port + node.index * PORTS_PER_NODE
    ports = {name: first + offset for name, offset in SERVICE_PORTS.items() if node.index == 0 or name not in HEAD_ONLY}
    ports["min-worker-port"], ports["max-worker-port"] = first + WORKER_PORTS[0], first + WORKER_PORTS[1]
    return ports


def dashboard_get(cluster: LocalCluster, path: str, timeout: float = 10) -> dict:
    """GET `path` from the head's dashboard with the cluster's token; the parsed JSON answer."""
    with open(cluster.token_path) as f:
        token = f.read().strip()
    request = urllib.request.Request(cluster.dashboard_url + path, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def ray_nodes(cluster: LocalCluster) -> List[Dict[str, str]]:
    """This cluster's nodes as the GCS knows them, dead ones included (a restarted node appears twice):
    [{'name', 'node_id', 'state'}] through the state API."""
    answer = dashboard_get(cluster, "/api/v0/nodes?detail=1&limit=1000")
    ours = {node.resource: node.name for node in cluster.nodes.values()}
    rows = []
    for row in answer["data"]["result"]["result"]:
        names = [ours[r] for r in row.get("resources_total", {}) if r in ours]
        if names:
            rows.append({"name": names[0], "node_id": row["node_id"], "state": row["state"]})
    return rows


def status(cluster: LocalCluster) -> dict:
    """What `status` prints: mode, addresses and, per node, address, namespace, pids and liveness."""
    alive = {row["name"] for row in _rows_or_none(cluster) if row["state"] == "ALIVE"}
    return {
        "name": cluster.name,
        "mode": cluster.mode,
        "dir": cluster.dir,
        "gcs_address": cluster.gcs_address,
        "dashboard_url": cluster.dashboard_url,
        "token_path": cluster.token_path,
        "nodes": {
            name: {
                "ip": node.ip,
                "netns": node.netns,
                "veth": node.veth,
                "cpus": node.num_cpus,
                "resource": node.resource,
                "processes": len(node_pids(cluster, name)),
                "alive": name in alive,
            }
            for name, node in cluster.nodes.items()
        },
    }


def submit_job(cluster: LocalCluster, argv: List[str], *, submission_id: str = "", wait: bool = True,
               timeout: float = 900) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir <repo> -- argv` against the cluster's Jobs API, from this machine,
    as a user types it. With `wait` it returns when the job ends (the CLI then exits non-zero on failure)."""
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [ray, "job", "submit", "--address", cluster.dashboard_url, "--working-dir", str(REPO)]
    command += (["--submission-id", submission_id] if submission_id else []) + ([] if wait else ["--no-wait"])
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and not k.startswith("RAY_AUTH")}
    return subprocess.run([*command, "--", *argv], env={**env, **cluster.client_env()}, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


def _new_node(cluster: LocalCluster, name: str, index: int, num_cpus: int) -> Node:
    if cluster.mode == "local":
        return Node(name=name, index=index, ip="127.0.0.1", num_cpus=num_cpus)
    return Node(name=name, index=index, ip=f"{cluster.subnet}.{10 + index}", num_cpus=num_cpus,
                netns=f"{cluster.name}-{name}", veth=f"{cluster.name}v{index}")


def _start_node(cluster: LocalCluster, node: Node, timeout: float = 120) -> None:
    """Start `node` under `ray start --block` and wait until the GCS holds it alive under a new node id."""
    cluster.nodes[node.name] = node
    cluster.save()  # recorded before it exists, so a stop after a failure here still cleans it up
    if node.netns and not os.path.exists(f"/var/run/netns/{node.netns}"):
        _create_netns(cluster, node)
    # A killed node stays ALIVE in the GCS until its health checks fail: only a new id is the restarted one.
    known = _node_ids(cluster) if node.index else set()
    env = node_env(cluster, node.name)
    if node.index == 0:  # the GCS, on the head, runs the node health checks
        env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold=str(cluster.dead_node_after_s))
    log = open(os.path.join(cluster.dir, f"{node.name}.log"), "ab")
    with log:
        process = subprocess.Popen(host_command(cluster, ray_start_argv(cluster, node), node.name), env=env,
                                   cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    node.pid = process.pid
    cluster.save()
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{node.name} exited with {process.returncode}; see {cluster.dir}/{node.name}.log")
        if any(
            row["name"] == node.name and row["state"] == "ALIVE" and row["node_id"] not in known
            for row in _rows_or_none(cluster)
        ):
            return
        time.sleep(0.5)
    raise RuntimeError(f"{node.name} did not join within {timeout:.0f} s; see {cluster.dir}/{node.name}.log")


def _node_ids(cluster: LocalCluster) -> set:
    return {row["node_id"] for row in _rows_or_none(cluster)}


def _rows_or_none(cluster: LocalCluster) -> List[Dict[str, str]]:
    """`ray_nodes`, or [] while the dashboard is not answering (still starting, or its head is down)."""
    try:
        return ray_nodes(cluster)
    except (OSError, KeyError, ValueError):  # URLError and refused connections are OSErrors
        return []


def ray_start_argv(cluster: LocalCluster, node: Node) -> List[str]:
    """`ray start --block ...` for `node`: its own address, ports, resources and temp dir."""
    argv = [
        os.path.join(os.path.dirname(sys.executable), "ray"),
        "start",
        "--block",
        "--disable-usage-stats",
        f"--node-ip-address={node.ip}",
        f"--num-cpus={node.num_cpus}",
        f"--resources={json.dumps({node.resource: 1})}",
        f"--object-store-memory={cluster.object_store_mb * 1024 * 1024}",
        f"--temp-dir={cluster.dir}/{node.name}",
    ]
    argv += [f"--{flag}={port}" for flag, port in node_ports(cluster, node).items() if not flag.isupper()]
    if node.index == 0:
        # The dashboard (and its Jobs API) binds the head's own address, never 0.0.0.0.
        return argv + ["--head", f"--dashboard-host={node.ip}", "--include-dashboard=true"]
    return argv + [f"--address={cluster.gcs_address}"]


def _kill_processes(cluster: LocalCluster, node: Node, timeout: float = 15) -> List[int]:
    """SIGKILL every process of `node` at once. Returns their pids.

    Each is stopped (SIGSTOP) as it is found, so none can start another process between the scan
    and the kill; the scan repeats until it finds no new one.
    """
    stopped: set = set()
    while found := set(node_pids(cluster, node.name)) - stopped:
        for pid in found:
            _signal(pid, signal.SIGSTOP)
        stopped |= found
    for pid in stopped:
        _signal(pid, signal.SIGKILL)
    deadline = time.time() + timeout
    while left := node_pids(cluster, node.name):
        if time.time() > deadline:
            raise RuntimeError(f"processes of {node.name} survive SIGKILL: {left}")
        time.sleep(0.1)
    if node.pid:
        _reap(node.pid)
    return sorted(stopped)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # exited meanwhile
        pass


def _reap(pid: int) -> None:
    """Collect the exit status of our own child (else it stays a zombie while this process runs)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # started by another process (the CLI): init reaps it
        pass


def _create_bridge(cluster: LocalCluster) -> None:
    cluster.subnet = _free_subnet()
    cluster.bridge = f"{cluster.name}br"
    cluster.save()
    _ip("link", "add", cluster.bridge, "type", "bridge")
    _ip("addr", "add", f"{cluster.subnet}.1/24", "dev", cluster.bridge)
    _ip("link", "set", cluster.bridge, "up")


def _create_netns(cluster: LocalCluster, node: Node) -> None:
    """A namespace with lo, an eth0 at the node's address and a default route through the bridge."""
    peer = f"{cluster.name}p{node.index}"
    _ip("netns", "add", node.netns)
    _ip("link", "add", node.veth, "type", "veth", "peer", "name", peer)
    _ip("link", "set", peer, "netns", node.netns)
    _ip("-n", node.netns, "link", "set", peer, "name", "eth0")
    _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
    _ip("-n", node.netns, "link", "set", "eth0", "up")
    _ip("-n", node.netns, "link", "set", "lo", "up")
    _ip("-n", node.netns, "route", "add", "default", "via", f"{cluster.subnet}.1")
    _ip("link", "set", node.veth, "master", cluster.bridge, "up")


def _netns_works() -> bool:
    """Try what netns mode needs: creating a namespace (root, iproute2, a kernel that allows it)."""
    probe = f"orcprobe{secrets.token_hex(3)}"
    try:
        if _ip("netns", "add", probe, check=False).returncode != 0:
            return False
    except FileNotFoundError:  # no `ip` at all
        return False
    _ip("netns", "del", probe, check=False)
    return True


def _free_subnet() -> str:
    """A 10.x.y /24 that no address or route on this machine touches yet."""
    used = _ip("-4", "addr").stdout + _ip("-4", "route").stdout
    for _ in range(1000):
        subnet = f"10.{random.randint(64, 250)}.{random.randint(0, 255)}"
        if f"{subnet}." not in used and f"{subnet}.0/" not in used:
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 subnet")


def _free_port_block(nodes: int) -> int:
    """A base port whose blocks for `nodes` nodes are free on this machine (nodes added later take their chance)."""
    for _ in range(200):
        base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - nodes * PORTS_PER_NODE, 100)
        if all(_port_free(port) for port in range(base, base + nodes * PORTS_PER_NODE)):
            return base
    raise RuntimeError(f"no free block of {nodes * PORTS_PER_NODE} ports in {PORT_RANGE}")


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _write_token(path: str) -> None:
    """256 random bits (what `ray get-auth-token --generate` makes), readable by this user only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def _node(cluster: LocalCluster, name: str) -> Node:
    if name not in cluster.nodes:
        raise ValueError(f"node must be one of {sorted(cluster.nodes)}, got {name!r}")
    return cluster.nodes[name]


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "start":
        spec = ClusterSpec(workers=args.workers, head_cpus=args.head_cpus, worker_cpus=args.worker_cpus,
                           object_store_mb=args.object_store_mb, base_port=args.base_port, mode=args.mode,
                           dead_node_after_s=args.dead_node_after_s)
        print(json.dumps(status(start_cluster(args.dir, spec)), indent=2))
        return 0
    if args.command == "stop":
        print("stopped" if stop_cluster(args.dir) else f"no cluster recorded in {args.dir}")
        return 0
    cluster = LocalCluster.load(os.path.abspath(args.dir))
    if cluster is None:
        print(f"no cluster recorded in {args.dir}", file=sys.stderr)
        return 1
    if args.command == "status":
        print(json.dumps(status(cluster), indent=2))
    elif args.command == "env":
        print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in cluster.client_env().items()))
    elif args.command == "kill-node":
        print(json.dumps({"node": args.node, "killed_pids": len(kill_node(cluster, args.node))}))
    elif args.command == "restart-node":
        print(json.dumps(asdict(restart_node(cluster, args.node))))
    elif args.command == "add-node":
        print(json.dumps(asdict(add_node(cluster, args.num_cpus))))
    elif args.command == "exec":
        command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        return subprocess.call(host_command(cluster, command, args.node), env=node_env(cluster, args.node))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cluster.local_cluster", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in [
        ("start", "start a head and worker nodes"),
        ("stop", "stop everything the cluster started"),
        ("status", "nodes, addresses, liveness"),
        ("env", "shell exports for clients (token, Jobs API)"),
        ("kill-node", "SIGKILL every process of a node (host loss)"),
        ("restart-node", "start a node again"),
        ("add-node", "start one more worker node"),
        ("exec", "run a command on a node's host, RAY_ADDRESS set"),
    ]:
        command = commands.add_parser(name, help=help_text)
        command.add_argument(
            "--dir", default="/tmp/orc-cluster", help="state, token, temp dirs and logs (keep it short)"
        )
        if name == "start":
            defaults = ClusterSpec()
            command.add_argument("--workers", type=int, default=defaults.workers)
            command.add_argument("--head-cpus", type=int, default=defaults.head_cpus)
            command.add_argument("--worker-cpus", type=int, default=defaults.worker_cpus)
            command.add_argument("--object-store-mb", type=int, default=defaults.object_store_mb)
            command.add_argument("--base-port", type=int, default=defaults.base_port)
            command.add_argument("--mode", choices=MODES, default=defaults.mode)
            command.add_argument("--dead-node-after-s", type=int, default=defaults.dead_node_after_s)
        if name in ("kill-node", "restart-node"):
            command.add_argument("node")
        if name == "add-node":
            command.add_argument("--num-cpus", type=int, default=0)
        if name == "exec":
            command.add_argument("--node", default="head")
            command.add_argument("argv", nargs=argparse.REMAINDER)
    return parser


if __name__ == "__main__":
    sys.exit(main())
