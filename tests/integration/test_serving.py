"""The serving layer on a real local Ray: small digits models in a registry, deployed with
run_deploy (API keys on, as by default) and spoken to over real HTTP (Open Inference Protocol v2)."""

import json
import shutil
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import requests
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ray import serve
from ray.serve.schema import ServeDeploySchema

from orchestrator.client import check_endpoint
from orchestrator.config import ModelConfig, PipelineConfig, ServeConfig, StorageConfig, to_config
from orchestrator.registry import WEIGHTS, IntegrityError, ModelRegistry, RegistryError
from orchestrator.training.models import build_model
from serve.app import app_builder, build_app
from serve.auth import KeyStore, keys_url
from serve.config_file import serve_config
from serve.deploy import run_deploy
from serve.names import CONTROLLER_DEPLOYMENT, INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, NAMESPACE, model_id
from serve.weights import weights_holder_name
from tests.integration.serving_support import INPUT_SHAPE, MODEL, digits, register
from tests.support import fit, free_port, infer_body

MAX_ROWS = 500
APP = ServeConfig().app_name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A registry with digits v1 (trained, 'production'), digits v2 (trained differently) and
    other_digits v1; held-out rows and the labels the in-process v1 gives them."""
    x, y = digits()
    cfg = PipelineConfig(
        model=ModelConfig(hidden=[32]),
        storage=StorageConfig(root=str(tmp_path_factory.mktemp("store"))),
        serve=ServeConfig(port=free_port(), min_replicas=2, max_replicas=2, max_rows_per_request=MAX_ROWS),
    )
    models = []
    for seed, steps in ((0, 300), (1, 60)):
        torch.manual_seed(seed)
        model = build_model(cfg.model, INPUT_SHAPE, 10)
        fit(model, x[:1400], y[:1400], steps)
        models.append(model)
    with torch.no_grad():
        expected = [m(torch.from_numpy(x[1400:])).argmax(dim=1).numpy() for m in models]
    assert float((expected[0] == y[1400:]).mean()) > 0.85, (
        "the test model must be good enough for label agreement to mean something"
    )
    register(cfg, models[0], alias="production")
    register(cfg, models[1])
    register(cfg, models[1], name="other_digits")
    return SimpleNamespace(cfg=cfg, val_x=x[1400:], expected=expected[0], expected_v2=expected[1])


@pytest.fixture(scope="module")
def deployed(ray_cluster, trained):
    result = run_deploy(trained.cfg)
    yield result
    serve.shutdown()


@pytest.fixture(scope="module")
def keys(deployed, trained):
    """A client per key kind: the deploy key (infer + admin), an infer-only key, a revoked key."""
    store = KeyStore(keys_url(trained.cfg.storage.root))
    infer_key, _ = store.create("infer-only", ["infer"])
    admin_key, _ = store.create("admin-only", ["admin"])
    revoked_key, revoked = store.create("revoked", ["infer", "admin"])
    store.revoke(revoked.id)
    time.sleep(trained.cfg.serve.auth.cache_ttl_s + 0.2)  # the ingress re-reads the store at most this often
    return SimpleNamespace(deploy=deployed.api_key, infer=infer_key, admin=admin_key, revoked=revoked_key)


def auth(key) -> dict:
    return {"Authorization": f"Bearer {key}"} if key else {}


def post_infer(deployed, rows, *, url=None, **extra) -> requests.Response:
    return requests.post(
        url or f"{deployed.endpoint}/infer", json=infer_body(rows, **extra), headers=auth(deployed.api_key), timeout=60
    )


def test_deploy_result_names_the_resolved_version_and_a_key(deployed, trained):
    assert deployed.model == MODEL and deployed.version == 1
    assert deployed.base_url == f"http://127.0.0.1:{trained.cfg.serve.port}"
    assert deployed.endpoint == f"{deployed.base_url}/v2/models/{MODEL}"
    assert deployed.api_key.startswith("orc_")
    stored = Path(keys_url(trained.cfg.storage.root).removeprefix("file://")).read_text()
    assert deployed.api_key.rsplit("_", 1)[1] not in stored, "the store must hold hashes, never the secret"


def test_health_is_open_and_metadata_needs_a_key(deployed):
    base = deployed.base_url
    assert requests.get(f"{base}/v2/health/live", timeout=10).json() == {"live": True}
    ready = requests.get(f"{base}/v2/health/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert requests.get(f"{base}/v2", timeout=10).json()["name"] == "orchestrator"
    assert requests.get(deployed.endpoint, timeout=10).status_code == 401
    metadata = requests.get(deployed.endpoint, headers=auth(deployed.api_key), timeout=10).json()
    assert metadata == {
        "name": MODEL,
        "versions": ["1"],
        "platform": "pytorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}],
        "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            {"name": "label", "datatype": "INT64", "shape": [-1]},
        ],
    }
    assert (
        requests.get(f"{deployed.endpoint}/versions/1", headers=auth(deployed.api_key), timeout=10).json() == metadata
    )
    assert requests.get(f"{deployed.endpoint}/ready", headers=auth(deployed.api_key), timeout=10).status_code == 200
    assert (
        requests.get(f"{deployed.endpoint}/versions/9", headers=auth(deployed.api_key), timeout=10).status_code == 404
    )


def test_infer_matches_the_in_process_model(deployed, trained):
    response = post_infer(deployed, trained.val_x, id="val-1")
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Name"] == MODEL and response.headers["X-Model-Version"] == "1"
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "1" and body["id"] == "val-1"
    probabilities, labels = body["outputs"]
    n = len(trained.val_x)
    assert probabilities["shape"] == [n, 10] and labels["shape"] == [n] and labels["datatype"] == "INT64"
    np.testing.assert_allclose(np.reshape(probabilities["data"], (n, 10)).sum(axis=1), 1.0, atol=1e-4)
    assert float((np.asarray(labels["data"]) == trained.expected).mean()) >= 0.99


def test_versions_and_aliases_are_routed_to_their_own_weights(deployed, trained):
    rows = trained.val_x[:3].reshape(3, *INPUT_SHAPE)
    body = {"inputs": [{"name": "input", "shape": [3, *INPUT_SHAPE], "datatype": "FP32", "data": rows.tolist()}]}
    for ref, version, expected in (
        ("1", "1", trained.expected),
        ("production", "1", trained.expected),
        ("2", "2", trained.expected_v2),
        ("latest", "2", trained.expected_v2),
    ):
        response = requests.post(
            f"{deployed.endpoint}/versions/{ref}/infer", json=body, headers=auth(deployed.api_key), timeout=30
        )
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == version and response.json()["model_version"] == version
        assert response.json()["outputs"][1]["data"] == expected[:3].tolist(), ref
    # Versioned requests leave the unversioned route on production.
    assert post_infer(deployed, trained.val_x[:1]).headers["X-Model-Version"] == "1"


def test_a_second_model_shares_the_model_replicas(deployed, trained):
    response = post_infer(deployed, trained.val_x[:4], url=f"{deployed.base_url}/v2/models/other_digits/infer")
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Name"] == "other_digits" and response.headers["X-Model-Version"] == "1"
    assert response.json()["outputs"][1]["data"] == trained.expected_v2[:4].tolist()
    # N models are not N deployments: the same three deployments serve both.
    assert set(serve.status().applications[APP].deployments) == {
        INGRESS_DEPLOYMENT,
        MODEL_DEPLOYMENT,
        CONTROLLER_DEPLOYMENT,
    }


def test_concurrent_requests_get_their_own_rows_back(deployed, trained):
    # Dynamic batching merges requests into one forward pass; each must get back its own rows.
    from concurrent.futures import ThreadPoolExecutor

    chunks = [np.arange(start, start + 1 + start % 5) for start in range(0, 160, 8)]

    def labels_of(indices):
        answer = post_infer(deployed, trained.val_x[indices])
        assert answer.status_code == 200, answer.text
        return answer.json()["outputs"][1]["data"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(labels_of, chunks))
    for indices, labels in zip(chunks, answers):
        assert labels == trained.expected[indices].tolist()


def test_check_endpoint_sends_the_key_itself(deployed, trained):
    body = check_endpoint(deployed, trained.val_x[:5])
    assert body["outputs"][1]["data"] == trained.expected[:5].tolist()


def test_auth_matrix(deployed, keys):
    infer = f"{deployed.endpoint}/infer"
    admin = f"{deployed.base_url}/admin/models/{MODEL}/rollout"
    body = infer_body(np.zeros((1, 64), np.float32))
    cases = [
        ("no key", "POST", infer, None, 401),
        ("no key on admin", "GET", admin, None, 401),
        ("bad key", "POST", infer, "orc_00000000_notakey", 401),
        ("garbage key", "POST", infer, "hunter2", 401),
        ("revoked key", "POST", infer, keys.revoked, 401),
        ("revoked key on admin", "GET", admin, keys.revoked, 401),
        ("infer key", "POST", infer, keys.infer, 200),
        ("infer key on admin", "GET", admin, keys.infer, 403),
        ("admin-only key on infer", "POST", infer, keys.admin, 403),
        ("admin key", "GET", admin, keys.admin, 200),
        ("deploy key on infer", "POST", infer, keys.deploy, 200),
        ("deploy key on admin", "GET", admin, keys.deploy, 200),
    ]
    for kind, method, url, key, status in cases:
        response = requests.request(method, url, json=body if method == "POST" else None, headers=auth(key), timeout=30)
        assert response.status_code == status, f"{kind}: {response.status_code} {response.text}"
        if status >= 400:
            assert response.json()["error"], kind
        if status == 401:
            assert response.headers["WWW-Authenticate"] == "Bearer", kind
    wrong_scheme = requests.post(infer, json=body, headers={"Authorization": f"Basic {keys.infer}"}, timeout=30)
    assert wrong_scheme.status_code == 401 and "Bearer" in wrong_scheme.json()["error"]


def bad_requests(endpoint: str, base: str, max_body: int):
    """(kind, method, url, raw body, expected status) of requests a client could get wrong."""
    infer = f"{endpoint}/infer"
    one = {"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [0.0] * 64}

    def with_input(**changes):
        return json.dumps({"inputs": [{**one, **changes}]})

    def raw_input(data: str):  # JSON the standard library would not write (NaN, Infinity)
        return '{"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": [' + data + "]}]}"

    admin = f"{base}/admin/models/{MODEL}"
    return [
        ("invalid json", "POST", infer, "{inputs: [", 400),
        ("empty body", "POST", infer, "", 400),
        ("not utf-8", "POST", infer, b"\xff\xfe{", 400),
        ("body not an object", "POST", infer, "[1, 2, 3]", 400),
        ("missing inputs", "POST", infer, "{}", 400),
        ("inputs empty", "POST", infer, '{"inputs": []}', 400),
        ("inputs not a list", "POST", infer, '{"inputs": {"name": "input"}}', 400),
        ("input not an object", "POST", infer, '{"inputs": ["x"]}', 400),
        ("two inputs", "POST", infer, json.dumps({"inputs": [one, one]}), 400),
        ("missing data", "POST", infer, json.dumps({"inputs": [{k: v for k, v in one.items() if k != "data"}]}), 400),
        ("missing shape", "POST", infer, json.dumps({"inputs": [{k: v for k, v in one.items() if k != "shape"}]}), 400),
        ("empty name", "POST", infer, with_input(name=""), 400),
        ("datatype INT64", "POST", infer, with_input(datatype="INT64"), 400),
        ("datatype BYTES", "POST", infer, with_input(datatype="BYTES"), 400),
        ("datatype fp99", "POST", infer, with_input(datatype="fp99"), 400),
        ("negative shape", "POST", infer, with_input(shape=[-1, 64]), 400),
        ("float shape", "POST", infer, with_input(shape=[1.0, 64]), 400),
        ("shape not a list", "POST", infer, with_input(shape="1x64"), 400),
        ("count != shape", "POST", infer, with_input(shape=[2, 64]), 400),
        ("wrong feature count", "POST", infer, with_input(shape=[2, 32]), 400),
        ("ragged nested", "POST", infer, with_input(shape=[2, 64], data=[[0.0] * 64, [0.0] * 63]), 400),
        ("string data", "POST", infer, with_input(data=["a"] * 64), 400),
        ("null data", "POST", infer, with_input(data=[None] * 64), 400),
        ("boolean data", "POST", infer, with_input(data=[True] * 64), 400),
        ("object data", "POST", infer, with_input(data=[{"x": 1}] * 64), 400),
        ("data not a list", "POST", infer, with_input(data="0" * 64), 400),
        ("NaN", "POST", infer, raw_input(", ".join(["NaN"] * 64)), 400),
        ("Infinity", "POST", infer, raw_input(", ".join(["Infinity"] * 64)), 400),
        ("beyond FP32", "POST", infer, with_input(data=[1e39] * 64), 400),
        ("id not a string", "POST", infer, json.dumps({"id": 7, "inputs": [one]}), 400),
        ("too many rows", "POST", infer, with_input(shape=[MAX_ROWS + 1, 64], data=[0.0] * (MAX_ROWS + 1) * 64), 413),
        ("body over the byte limit", "POST", infer, " " * (max_body + 1), 413),
        ("unknown model", "POST", f"{base}/v2/models/nope/infer", with_input(), 404),
        ("unknown version", "POST", f"{endpoint}/versions/9/infer", with_input(), 404),
        ("unknown alias", "POST", f"{endpoint}/versions/staging/infer", with_input(), 404),
        ("unknown route", "GET", f"{base}/v3/whatever", None, 404),
        ("wrong method", "GET", infer, None, 405),
        ("wrong method on health", "POST", f"{base}/v2/health/live", "{}", 405),
        ("rollout body not json", "POST", f"{admin}/rollout", "{", 400),
        ("rollout without version", "POST", f"{admin}/rollout", '{"percent": 10}', 400),
        ("rollout percent 150", "POST", f"{admin}/rollout", '{"version": 2, "percent": 150}', 400),
        ("rollout of an unknown version", "POST", f"{admin}/rollout", '{"version": 42, "percent": 10}', 404),
        ("rollout of the stable version", "POST", f"{admin}/rollout", '{"version": 1, "percent": 10}', 409),
        ("promote with no candidate", "POST", f"{admin}/promote", "{}", 409),
        ("admin on an unknown model", "GET", f"{base}/admin/models/nope/rollout", None, 404),
    ]


def test_bad_requests_are_4xx_with_a_reason(deployed, trained):
    answers = {}
    cases = bad_requests(deployed.endpoint, deployed.base_url, trained.cfg.serve.limits.max_body_bytes)
    for kind, method, url, data, status in cases:
        response = requests.request(method, url, data=data, headers=auth(deployed.api_key), timeout=30)
        answers[kind] = response.status_code
        assert response.status_code == status, f"{kind}: {response.status_code} {response.text}"
        assert isinstance(response.json()["error"], str) and response.json()["error"], kind
    assert len(answers) >= 30
    assert not [kind for kind, status in answers.items() if status >= 500]
    assert post_infer(deployed, np.zeros((1, 64), np.float32)).status_code == 200


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)
numbers = st.one_of(st.integers(-10**40, 10**40), st.floats(allow_nan=False, allow_infinity=False))
tensors = st.fixed_dictionaries(
    {
        "name": st.one_of(st.just("input"), st.text(max_size=4)),
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "fp32", ""]),
        "shape": st.lists(st.integers(-2, 70), max_size=4),
        "data": st.one_of(st.lists(numbers, max_size=130), json_values),
    },
    optional={"parameters": json_values},
)
bodies = st.one_of(json_values, st.fixed_dictionaries({"inputs": st.one_of(st.lists(tensors, max_size=2), json_values)},
                                                      optional={"id": json_values, "outputs": json_values}))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_fuzzed_infer_bodies_never_get_a_5xx(deployed, body):
    response = requests.post(
        f"{deployed.endpoint}/infer", data=json.dumps(body), headers=auth(deployed.api_key), timeout=30
    )
    assert response.status_code < 500, response.text
    assert response.status_code == 200 or response.json()["error"]


def test_replicas_share_one_weights_copy(deployed):
    handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=APP).options(
        multiplexed_model_id=model_id(MODEL, 1)
    )
    infos = {}
    for _ in range(
        5
    ):  # bursts of held calls: the router keeps a model's calls on a replica that has it until it is full
        for response in [handle.weights_info.remote(hold_s=3.0) for _ in range(40)]:
            info = response.result(timeout_s=60)
            infos[info["replica"]] = info
        if len(infos) == 2:
            break
    assert len(infos) == 2, "min_replicas=2 should give two replicas"
    first, second = infos.values()
    assert first["object_ref"] == second["object_ref"] and first["pid"] != second["pid"]
    assert first["writeable"] is False and second["writeable"] is False
    assert first["version"] == second["version"] == 1


def test_ingress_controller_and_weights_holders_exist(deployed, trained):
    registry = ModelRegistry(trained.cfg.storage.root)
    for model, version in (
        (MODEL, 1),
        (MODEL, 2),
        ("other_digits", 1),
    ):  # every version served so far holds its weights
        assert ray.get_actor(weights_holder_name(registry.get(model, version)), namespace=NAMESPACE)


def test_metrics_per_model_and_version_reach_prometheus(deployed, trained):
    (node,) = [n for n in ray.nodes() if n["Alive"]]  # the embedded Ray is one node
    port = node["MetricsExportPort"]
    deadline, text = time.time() + 45, ""
    while time.time() < deadline:  # Ray's metrics agent exports every few seconds
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        if (
            "orchestrator_request_latency_ms_bucket" in text
            and "orchestrator_batch_size_bucket" in text
            and 'status="401"' in text
        ):
            break
        time.sleep(2)
    requests_lines = [line for line in text.splitlines() if line.startswith("ray_orchestrator_requests_total")]
    assert any(
        'model="digits"' in line and 'version="1"' in line and 'status="200"' in line for line in requests_lines
    ), requests_lines
    assert any('model="other_digits"' in line for line in requests_lines)
    assert any(
        line.startswith("ray_orchestrator_request_errors_total") and 'status="404"' in line
        for line in text.splitlines()
    )
    assert "ray_orchestrator_batch_size_bucket" in text and "ray_orchestrator_request_latency_ms_bucket" in text


def test_tampered_weights_make_build_app_raise(ray_cluster, trained, tmp_path):
    root = tmp_path / "tampered"
    shutil.copytree(trained.cfg.storage.root.removeprefix("file://"), root)
    weights = root / "registry" / MODEL / "versions" / "1" / WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    weights.write_bytes(bytes(blob))
    cfg = to_config(trained.cfg, {"storage.root": str(root)})
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


def test_written_serve_config_deploys_and_serves(deployed, trained):
    cfg = to_config(trained.cfg, {"serve.app_name": "from_file", "serve.min_replicas": 1, "serve.max_replicas": 1})
    config = serve_config(cfg)
    (application,) = ServeDeploySchema(**config).applications
    assert application.args["ref"] == "production" and application.args["auth"]["enabled"] is True
    # What `serve run <file>` does: import the builder, call it with the args, run the app.
    serve.run(app_builder(application.args), name="from_file", route_prefix="/from_file")
    try:
        response = post_infer(deployed, trained.val_x[:2], url=f"{deployed.base_url}/from_file/v2/models/{MODEL}/infer")
        assert response.status_code == 200, response.text
        assert response.headers["X-Model-Version"] == "1"
        assert (
            requests.post(
                f"{deployed.base_url}/from_file/v2/models/{MODEL}/infer", json=infer_body(trained.val_x[:1]), timeout=30
            ).status_code
            == 401
        )
    finally:
        serve.delete("from_file")
