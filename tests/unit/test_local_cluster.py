"""cluster/local_cluster.py without Ray: specs, each node's ports and flags, the state file, and finding
and killing exactly one node's processes."""

import os
import subprocess
import time

import pytest

from cluster.local_cluster import (
    MARKER,
    ClusterSpec,
    LocalCluster,
    Node,
    kill_node,
    node_env,
    node_pids,
    node_ports,
    ray_start_argv,
    stop_cluster,
)


def _cluster(tmp_path, mode: str = "netns") -> LocalCluster:
    cluster = LocalCluster(
        dir=str(tmp_path),
        name="orctest01",
        mode=mode,
        base_port=21000,
        object_store_mb=300,
        worker_cpus=4,
        subnet="10.99.1" if mode == "netns" else "",
        bridge="orctest01br" if mode == "netns" else "",
    )
    for index, name in enumerate(["head", "worker1", "worker2"]):
        ip = f"10.99.1.{10 + index}" if mode == "netns" else "127.0.0.1"
        cluster.nodes[name] = Node(name=name, index=index, ip=ip, num_cpus=4 if index else 0,
                                   netns=f"orctest01-{name}" if mode == "netns" else "")
    return cluster


@pytest.mark.parametrize(
    "field, value", [("workers", -1), ("worker_cpus", 0), ("object_store_mb", 10), ("base_port", 80), ("mode", "vm")]
)
def test_spec_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ClusterSpec(**{field: value})


def test_every_node_gets_its_own_explicit_ports_outside_rays_worker_range(tmp_path):
    cluster = _cluster(tmp_path)
    blocks = {}
    for node in cluster.nodes.values():
        ports = node_ports(cluster, node)
        flags = dict(
            arg[2:].split("=", 1) for arg in ray_start_argv(cluster, node) if arg.startswith("--") and "=" in arg
        )
        env = node_env(cluster, node.name)
        # Every port reaches Ray: as a `ray start` flag, or (upper case) through the node's environment.
        assert all((env[name] if name.isupper() else flags[name]) == str(port) for name, port in ports.items())
        blocks[node.name] = set(ports.values()) | set(range(ports["min-worker-port"], ports["max-worker-port"] + 1))
        assert flags["node-ip-address"] == node.ip and flags["temp-dir"] == f"{cluster.dir}/{node.name}"
        assert flags["resources"] == f'{{"{node.resource}": 1}}'
        if node.index == 0:
            assert flags["dashboard-host"] == node.ip and cluster.gcs_address == f"{node.ip}:{flags['port']}"
        else:
            assert flags["address"] == cluster.gcs_address and "dashboard-host" not in flags and "port" not in flags
    assert all(not 10000 <= port <= 20000 for block in blocks.values() for port in block)
    assert (
        not blocks["head"] & blocks["worker1"]
        and not blocks["worker1"] & blocks["worker2"]
        and not blocks["head"] & blocks["worker2"]
    )


def test_state_file_round_trips_and_stop_is_idempotent(tmp_path):
    assert stop_cluster(str(tmp_path)) is False  # nothing recorded: nothing to do
    cluster = _cluster(tmp_path, mode="local")
    cluster.save()
    assert LocalCluster.load(str(tmp_path)) == cluster
    assert stop_cluster(str(tmp_path)) is True
    assert LocalCluster.load(str(tmp_path)) is None and stop_cluster(str(tmp_path)) is False


def test_kill_node_kills_that_nodes_processes_and_their_children_only(tmp_path):
    cluster = _cluster(tmp_path, mode="local")
    started = {}
    for name in ("worker1", "worker2"):
        # A parent and a child that lost the marker, like the dashboard's forkserver children.
        env = {**os.environ, MARKER: f"{cluster.name}/{name}"}
        started[name] = subprocess.Popen(["sh", "-c", f"env -u {MARKER} sleep 60 & exec sleep 61"], env=env)
    try:
        deadline = time.time() + 5
        while len(node_pids(cluster, "worker1")) < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert started["worker1"].pid in node_pids(cluster, "worker1") and len(node_pids(cluster, "worker1")) == 2
        killed = kill_node(cluster, "worker1")
        assert len(killed) == 2 and node_pids(cluster, "worker1") == []
        assert started["worker1"].wait(timeout=5) == -9
        assert started["worker2"].poll() is None and len(node_pids(cluster, "worker2")) == 2
    finally:
        kill_node(cluster, "worker2")
        started["worker2"].wait(timeout=5)
