"""The serving layer on a real local Ray: a tiny trained digits model, deployed with run_deploy and
spoken to over real HTTP (Open Inference Protocol v2)."""

import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import requests
import torch
import yaml
from ray import serve
from ray.serve.schema import ServeDeploySchema
from sklearn.datasets import load_digits

from orchestrator.config import ModelConfig, PipelineConfig, ServeConfig, StorageConfig, to_dict, with_overrides
from orchestrator.models import build_model
from orchestrator.registry import WEIGHTS, IntegrityError, ModelRegistry, RegistryError, signature_for
from orchestrator.serving import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, NAMESPACE, build_app, check_endpoint, run_deploy, weights_holder_name
from serve.app import app_builder

MODEL = "digits"
INPUT_SHAPE = [1, 8, 8]
MAX_ROWS = 500


def free_port() -> int:
    """A free TCP port on loopback outside Ray's worker port range (10002-19999)."""
    for _ in range(50):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port
    raise RuntimeError("no free port outside 10002-19999")


def fit_digits_mlp(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    inputs, targets = torch.from_numpy(x), torch.from_numpy(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~1 s of CPU; more threads only spin on a busy small machine
    try:
        for _ in range(300):  # full batch: about 90% accurate on held-out rows
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(inputs), targets).backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A registry with version 1 of a small trained MLP, aliased 'production'; held-out rows and
    the labels the in-process model gives them."""
    features, labels = load_digits(return_X_y=True)
    x, y = (features / 16.0).astype(np.float32), labels.astype(np.int64)
    cfg = PipelineConfig(
        model=ModelConfig(hidden=[32]),
        storage=StorageConfig(root=str(tmp_path_factory.mktemp("store"))),
        serve=ServeConfig(port=free_port(), min_replicas=2, max_replicas=2, max_rows_per_request=MAX_ROWS),
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, INPUT_SHAPE, 10)
    fit_digits_mlp(model, x[:1400], y[:1400])
    with torch.no_grad():
        expected = model(torch.from_numpy(x[1400:])).argmax(dim=1).numpy()
    accuracy = float((expected == y[1400:]).mean())
    assert accuracy > 0.85, "the test model must be good enough for label agreement to mean something"
    registry = ModelRegistry(cfg.storage.root)
    version = registry.register(
        MODEL, {k: v.numpy() for k, v in model.state_dict().items()}, config=to_dict(cfg),
        signature=signature_for(INPUT_SHAPE, 10), lineage={"source": "test_serving"}, metrics={"val_accuracy": accuracy},
    )
    registry.set_alias(MODEL, "production", version.version)
    return SimpleNamespace(cfg=cfg, val_x=x[1400:], expected=expected)


@pytest.fixture(scope="module")
def deployed(ray_cluster, trained):
    result = run_deploy(trained.cfg)
    yield result
    serve.shutdown()


def infer_body(rows: np.ndarray, **extra) -> dict:
    return {"inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}], **extra}


def test_deploy_result_names_the_resolved_version(deployed, trained):
    assert deployed.model == MODEL and deployed.version == 1
    assert deployed.base_url == f"http://127.0.0.1:{trained.cfg.serve.port}"
    assert deployed.endpoint == f"{deployed.base_url}/v2/models/{MODEL}"


def test_health_and_metadata(deployed):
    base = deployed.base_url
    assert requests.get(f"{base}/v2/health/live", timeout=10).json() == {"live": True}
    ready = requests.get(f"{base}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert requests.get(f"{base}/v2", timeout=10).json()["name"] == "orchestrator"
    metadata = requests.get(deployed.endpoint, timeout=10).json()
    assert metadata == {
        "name": MODEL, "versions": ["1"], "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}, {"name": "label", "datatype": "INT64", "shape": [-1]}],
    }
    assert requests.get(f"{deployed.endpoint}/versions/1", timeout=10).json() == metadata
    assert requests.get(f"{deployed.endpoint}/ready", timeout=10).status_code == 200
    assert requests.get(f"{deployed.endpoint}/versions/2", timeout=10).status_code == 404


def test_infer_matches_the_in_process_model(deployed, trained):
    response = requests.post(f"{deployed.endpoint}/infer", json=infer_body(trained.val_x, id="val-1"), timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Version"] == "1"
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "1" and body["id"] == "val-1"
    probabilities, labels = body["outputs"]
    n = len(trained.val_x)
    assert probabilities["shape"] == [n, 10] and labels["shape"] == [n] and labels["datatype"] == "INT64"
    np.testing.assert_allclose(np.reshape(probabilities["data"], (n, 10)).sum(axis=1), 1.0, atol=1e-4)
    agreement = float((np.asarray(labels["data"]) == trained.expected).mean())
    assert agreement >= 0.99


def test_nested_batched_shape_and_versioned_route(deployed, trained):
    rows = trained.val_x[:3].reshape(3, *INPUT_SHAPE)
    body = {"inputs": [{"name": "input", "shape": [3, *INPUT_SHAPE], "datatype": "FP32", "data": rows.tolist()}]}
    response = requests.post(f"{deployed.endpoint}/versions/1/infer", json=body, timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][1]["data"] == trained.expected[:3].tolist()


def test_concurrent_requests_get_their_own_rows_back(deployed, trained):
    # Dynamic batching merges requests into one forward pass; each must get back its own rows.
    chunks = [np.arange(start, start + 1 + start % 5) for start in range(0, 160, 8)]

    def labels_of(indices):
        answer = requests.post(f"{deployed.endpoint}/infer", json=infer_body(trained.val_x[indices]), timeout=60)
        assert answer.status_code == 200, answer.text
        return answer.json()["outputs"][1]["data"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(labels_of, chunks))
    for indices, labels in zip(chunks, answers):
        assert labels == trained.expected[indices].tolist()


def test_check_endpoint(deployed, trained):
    body = check_endpoint(deployed, trained.val_x[:5])
    assert body["outputs"][1]["data"] == trained.expected[:5].tolist()


def bad_requests(endpoint: str, base: str):
    """(kind, method, url, raw body, expected status) of requests a client could get wrong."""
    infer = f"{endpoint}/infer"
    one = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}

    def with_input(**changes):
        return json.dumps({"inputs": [{**one, **changes}]})

    def raw_input(data: str):  # JSON the standard library would not write (NaN, Infinity)
        return '{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [%s]}]}' % data

    return [
        ("invalid json", "POST", infer, "{inputs: [", 400),
        ("body not an object", "POST", infer, "[1, 2, 3]", 400),
        ("missing inputs", "POST", infer, "{}", 400),
        ("inputs empty", "POST", infer, '{"inputs": []}', 400),
        ("input not an object", "POST", infer, '{"inputs": ["x"]}', 400),
        ("two inputs", "POST", infer, json.dumps({"inputs": [one, one]}), 400),
        ("missing data", "POST", infer, json.dumps({"inputs": [{k: v for k, v in one.items() if k != "data"}]}), 400),
        ("missing shape", "POST", infer, json.dumps({"inputs": [{k: v for k, v in one.items() if k != "shape"}]}), 400),
        ("datatype INT64", "POST", infer, with_input(datatype="INT64"), 400),
        ("datatype BYTES", "POST", infer, with_input(datatype="BYTES"), 400),
        ("datatype fp99", "POST", infer, with_input(datatype="fp99"), 400),
        ("negative shape", "POST", infer, with_input(shape=[-1, 64]), 400),
        ("count != shape", "POST", infer, with_input(shape=[2, 64]), 400),
        ("wrong feature count", "POST", infer, with_input(shape=[2, 32]), 400),
        ("string data", "POST", infer, with_input(data=["a"] * 64), 400),
        ("null data", "POST", infer, with_input(data=[None] * 64), 400),
        ("boolean data", "POST", infer, with_input(data=[True] * 64), 400),
        ("object data", "POST", infer, with_input(data=[{"x": 1}] * 64), 400),
        ("NaN", "POST", infer, raw_input(", ".join(["NaN"] * 64)), 400),
        ("Infinity", "POST", infer, raw_input(", ".join(["Infinity"] * 64)), 400),
        ("too many rows", "POST", infer, with_input(shape=[MAX_ROWS + 1, 64], data=[0.0] * (MAX_ROWS + 1) * 64), 413),
        ("unknown model", "POST", f"{base}/v2/models/nope/infer", with_input(), 404),
        ("unknown version", "POST", f"{endpoint}/versions/9/infer", with_input(), 404),
        ("unknown route", "GET", f"{base}/v3/whatever", None, 404),
        ("wrong method", "GET", infer, None, 405),
        ("wrong method on health", "POST", f"{base}/v2/health/live", "{}", 405),
    ]


def test_bad_requests_are_4xx_with_a_reason(deployed):
    answers = {}
    for kind, method, url, data, status in bad_requests(deployed.endpoint, deployed.base_url):
        response = requests.request(method, url, data=data, timeout=30)
        answers[kind] = (response.status_code, response.text)
        assert response.status_code == status, f"{kind}: {response.status_code} {response.text}"
        assert isinstance(response.json()["error"], str) and response.json()["error"], kind
    assert len(answers) >= 12
    assert not [kind for kind, (status, _) in answers.items() if status >= 500]
    good = requests.post(f"{deployed.endpoint}/infer", json=infer_body(np.zeros((1, 64), np.float32)), timeout=30)
    assert good.status_code == 200, good.text


def test_replicas_share_one_weights_copy(deployed):
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=deployed_app_name())
    infos = {}
    for _ in range(40):  # the router spreads calls over both replicas
        info = handle.weights_info.remote().result(timeout_s=30)
        infos[info["replica"]] = info
        if len(infos) == 2:
            break
    assert len(infos) == 2, "min_replicas=2 should give two replicas"
    first, second = infos.values()
    assert first["object_ref"] == second["object_ref"]
    assert first["writeable"] is False and second["writeable"] is False
    assert first["version"] == second["version"] == 1


def deployed_app_name() -> str:
    return ServeConfig().app_name


def test_ingress_and_weights_holder_exist(deployed, trained):
    status = serve.status().applications[deployed_app_name()]
    assert set(status.deployments) == {INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT}
    version = ModelRegistry(trained.cfg.storage.root).get(MODEL, 1)
    assert ray.get_actor(weights_holder_name(version), namespace=NAMESPACE)  # raises ValueError when absent


def test_tampered_weights_make_build_app_raise(ray_cluster, trained, tmp_path):
    root = tmp_path / "tampered"
    shutil.copytree(trained.cfg.storage.root.removeprefix("file://"), root)
    weights = root / "registry" / MODEL / "versions" / "1" / WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    cfg = with_overrides(trained.cfg, {"storage.root": str(root)})
    with pytest.raises(IntegrityError):
        build_app(cfg, "production")
    with pytest.raises(RegistryError):
        build_app(trained.cfg, "no-such-alias")


def test_serve_config_file_is_valid_and_its_builder_builds(ray_cluster, trained):
    config = yaml.safe_load((Path(__file__).parents[2] / "serve" / "config.yaml").read_text())
    schema = ServeDeploySchema(**config)
    (application,) = schema.applications
    assert application.import_path == "serve.app:app_builder" and application.route_prefix == "/"
    args = {**application.args, "storage_root": trained.cfg.storage.root}
    app = app_builder(args)
    assert isinstance(app, serve.Application)
    with pytest.raises(ValueError, match="unknown serve app args"):
        app_builder({**args, "replicas": 3})
