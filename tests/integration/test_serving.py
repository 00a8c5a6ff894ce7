"""The serving layer on a real local Ray: small digits models in a registry, deployed with
run_deploy (API keys on, as by default) and spoken to over real HTTP (Open Inference Protocol v2)."""

import copy
import json
import re
import shutil
import time
import urllib.request
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, List, Sequence, Tuple

import ml_dtypes
import numpy as np
import pytest
import ray
import requests
import schemathesis
import torch
import tritonclient.http as triton
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from ray import serve
from ray.serve.schema import ServeDeploySchema
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from tritonclient.utils import InferenceServerException

from orchestrator.client import Client, InferenceError, check_endpoint
from orchestrator.config import ModelConfig, PipelineConfig, ServeConfig, StorageConfig, to_config
from orchestrator.registry import WEIGHTS, IntegrityError, ModelRegistry, RegistryError
from orchestrator.training.models import build_model
from serve.app import app_builder, build_app
from serve.auth import KeyStore, keys_url
from serve.config_file import serve_config
from serve.deploy import run_deploy
from serve.names import CONTROLLER_DEPLOYMENT, INGRESS_DEPLOYMENT, NAMESPACE
from serve.protocol import project_version
from serve.weights import weights_holder_name
from tests.integration.serving_support import INPUT_SHAPE, MODEL, digits, register
from tests.support import fit, free_port, infer_body

MAX_ROWS = 500
APP = ServeConfig().app_name


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A registry with digits v1 (trained, 'production'), digits v2 (trained differently) and
    other_digits v1; held-out rows, the labels the in-process v1 gives them, and the in-process models."""
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
    return SimpleNamespace(cfg=cfg, val_x=x[1400:], expected=expected[0], expected_v2=expected[1], models=models)


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


def test_a_second_model_shares_the_serving_replicas(deployed, trained):
    response = post_infer(deployed, trained.val_x[:4], url=f"{deployed.base_url}/v2/models/other_digits/infer")
    assert response.status_code == 200, response.text
    assert response.headers["X-Model-Name"] == "other_digits" and response.headers["X-Model-Version"] == "1"
    assert response.json()["outputs"][1]["data"] == trained.expected_v2[:4].tolist()
    # N models are not N deployments: the same two deployments serve both, and only one is on the
    # request path (the replica that parses a request runs the model).
    assert set(serve.status().applications[APP].deployments) == {INGRESS_DEPLOYMENT, CONTROLLER_DEPLOYMENT}


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


# -- the protocol at the endpoint: standard clients, every FP datatype into FP32, binary data -------


def in_process(model: torch.nn.Module, rows: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(probabilities, labels) the in-process model gives float32 `rows`."""
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.from_numpy(np.ascontiguousarray(rows, np.float32))), dim=1).numpy()
    return probabilities, probabilities.argmax(axis=1)


@pytest.fixture(scope="module")
def v2(deployed):
    """orchestrator.client.Client of the deployment, with the deploy key (binary tensors by default)."""
    with Client(deployed.base_url, api_key=deployed.api_key) as client:
        yield client


def test_tritonclient_with_its_default_settings(deployed, trained):
    client = triton.InferenceServerClient(url=deployed.base_url.removeprefix("http://"))

    def keyed() -> Dict[str, str]:  # a new dict each call: tritonclient.infer adds its own headers to the one given
        return auth(deployed.api_key)

    try:
        assert client.is_server_live(headers=keyed()) and client.is_server_ready(headers=keyed())
        server = client.get_server_metadata(headers=keyed())
        assert server["name"] == "orchestrator" and "binary_tensor_data" in server["extensions"]
        metadata = client.get_model_metadata(MODEL, headers=keyed())
        assert metadata["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
        assert client.is_model_ready(MODEL, headers=keyed()) and client.is_model_ready(MODEL, "2", headers=keyed())
        assert not client.is_model_ready("nope", headers=keyed())

        tensor = triton.InferInput("input", list(trained.val_x.shape), "FP32")
        tensor.set_data_from_numpy(trained.val_x)  # binary data: tritonclient's default
        wanted = [triton.InferRequestedOutput("probabilities"), triton.InferRequestedOutput("label")]
        result = client.infer(MODEL, [tensor], outputs=wanted, request_id="triton-1", headers=keyed())
        response = result.get_response()
        assert response["id"] == "triton-1" and response["model_version"] == "1"
        assert [o["parameters"]["binary_data_size"] for o in response["outputs"]] == [len(trained.val_x) * 40,
                                                                                     len(trained.val_x) * 8]
        probabilities, labels = in_process(trained.models[0], trained.val_x)
        assert result.as_numpy("label").dtype == np.int64 and result.as_numpy("probabilities").dtype == np.float32
        np.testing.assert_array_equal(result.as_numpy("label"), trained.expected)
        np.testing.assert_allclose(result.as_numpy("probabilities"), probabilities, atol=1e-5)

        # No outputs named: tritonclient asks for every output in binary (binary_data_output).
        every = client.infer(MODEL, [tensor], headers=keyed())
        assert [o["name"] for o in every.get_response()["outputs"] if "binary_data_size" in o["parameters"]] == [
            "probabilities", "label"]
        np.testing.assert_array_equal(every.as_numpy("label"), trained.expected)
        np.testing.assert_array_equal(every.as_numpy("probabilities"), result.as_numpy("probabilities"))
        # JSON tensors both ways, as tritonclient sends them when told to.
        tensor.set_data_from_numpy(trained.val_x, binary_data=False)
        plain = client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("label", binary_data=False)],
                             headers=keyed())
        assert "data" in plain.get_response()["outputs"][0]
        np.testing.assert_array_equal(plain.as_numpy("label"), trained.expected)
        versioned = client.infer(MODEL, [tensor], model_version="2", outputs=wanted[1:], headers=keyed())
        assert versioned.as_numpy("probabilities") is None
        np.testing.assert_array_equal(versioned.as_numpy("label"), trained.expected_v2)

        with pytest.raises(InferenceServerException, match="not an output of this model"):
            client.infer(MODEL, [tensor], outputs=[triton.InferRequestedOutput("nope")], headers=keyed())
        with pytest.raises(InferenceServerException, match="Bearer"):
            client.infer(MODEL, [tensor])
    finally:
        client.close()


def test_client_binary_and_json_answers_agree(v2, trained):
    binary = v2.infer(MODEL, trained.val_x, request_id="bin-1")
    plain = v2.infer(MODEL, trained.val_x, request_id="json-1", binary=False)
    assert binary.headers["content-type"] == "application/octet-stream"
    assert int(binary.headers["inference-header-content-length"]) < len(trained.val_x) * 48
    assert plain.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in plain.headers
    assert (binary.id, plain.id) == ("bin-1", "json-1")
    for result in (binary, plain):
        assert list(result.outputs) == ["probabilities", "label"]
        assert result.model_name == MODEL and result.model_version == "1" and result.headers["x-model-version"] == "1"
        np.testing.assert_array_equal(result["label"], trained.expected)
    np.testing.assert_array_equal(binary["probabilities"], plain["probabilities"])
    np.testing.assert_allclose(binary["probabilities"], in_process(trained.models[0], trained.val_x)[0], atol=1e-5)


def test_client_output_selection_versions_and_headers(v2, trained):
    rows = trained.val_x[:20]
    for binary in (True, False):
        only = v2.infer(MODEL, rows, outputs=["label"], binary=binary)
        assert list(only.outputs) == ["label"] and [o["name"] for o in only.response["outputs"]] == ["label"]
        np.testing.assert_array_equal(only["label"], trained.expected[:20])
        both = v2.infer(MODEL, rows, outputs=["label", "probabilities"], binary=binary)
        assert list(both.outputs) == ["label", "probabilities"]  # in the order asked for
    for ref, version, expected in (("2", "2", trained.expected_v2), (2, "2", trained.expected_v2),
                                   ("production", "1", trained.expected), ("latest", "2", trained.expected_v2)):
        result = v2.infer(MODEL, rows, version=ref)
        assert result.headers["x-model-version"] == version == result.model_version, ref
        assert result.headers["x-model-name"] == MODEL
        np.testing.assert_array_equal(result["label"], expected[:20])


def test_client_errors_name_what_is_wrong(v2, trained):
    rows = trained.val_x[:3]
    cases = [
        ("unknown output", dict(inputs=rows, outputs=["label", "nope"]), 400, "'nope' is not an output"),
        ("undeclared input", dict(inputs={"input": rows, "extra": rows}), 400, "'extra' is not an input"),
        ("only an undeclared input", dict(inputs={"pixels": rows}), 400, "'pixels' is not an input"),
        ("parameter value a list", dict(inputs=rows, parameters={"priority": [1]}), 400, "parameters['priority']"),
        ("parameter value an object", dict(inputs=rows, parameters={"k": {"a": 1}}), 400, "parameters['k']"),
        ("parameter value null", dict(inputs=rows, parameters={"k": None}), 400, "parameters['k']"),
        ("INT64 into FP32", dict(inputs=rows.astype(np.int64)), 400, "takes 'FP32'"),
        ("unknown version", dict(inputs=rows, version=9), 404, "9"),
    ]
    for binary in (True, False):
        for kind, call, status, message in cases:
            with pytest.raises(InferenceError) as caught:
                v2.infer(MODEL, **{"binary": binary, **call})
            assert caught.value.status == status, f"{kind}: {caught.value}"
            assert message in caught.value.message, f"{kind}: {caught.value.message}"
    # Well-formed parameters are accepted where the protocol allows them.
    result = v2.infer(MODEL, rows, parameters={"priority": 2, "note": "x", "urgent": True, "ratio": 0.5})
    np.testing.assert_array_equal(result["label"], trained.expected[:3])


def test_fp16_fp64_and_bf16_inputs_run_as_their_values_rounded(v2, trained):
    # Digits pixels are multiples of 1/16, which FP16 and BF16 hold exactly: add noise so rounding counts.
    rows = trained.val_x[:64] + np.random.default_rng(0).normal(0, 0.05, (64, 64))
    sent: List[Tuple[str, Dict[str, Any], np.ndarray]] = [
        ("FP16", {"inputs": rows.astype(np.float16)}, rows.astype(np.float16).astype(np.float32)),
        ("FP64", {"inputs": rows}, rows.astype(np.float32)),
        ("BF16", {"inputs": rows, "datatypes": {"input": "BF16"}}, rows.astype(ml_dtypes.bfloat16).astype(np.float32)),
    ]
    unrounded, _ = in_process(trained.models[0], rows.astype(np.float32))
    for datatype, call, rounded in sent:
        probabilities, labels = in_process(trained.models[0], rounded)
        for binary in (True, False):
            result = v2.infer(MODEL, binary=binary, **call)
            np.testing.assert_array_equal(result["label"], labels, err_msg=f"{datatype} binary={binary}")
            np.testing.assert_allclose(result["probabilities"], probabilities, atol=1e-6,
                                       err_msg=f"{datatype} binary={binary}")
        if datatype == "BF16":  # the rounding is big enough that the answers show the server used it
            assert np.abs(result["probabilities"] - unrounded).max() > 1e-4


def raw_infer(deployed, header: Dict[str, Any], blob: bytes = b"", *, length: Any = "auto") -> requests.Response:
    """POST a JSON header and binary data as the binary tensor data extension lays them out."""
    head = json.dumps(header).encode()
    headers = {**auth(deployed.api_key), "Content-Type": "application/octet-stream"}
    if length is not None:
        headers["Inference-Header-Content-Length"] = str(len(head) if length == "auto" else length)
    return requests.post(f"{deployed.endpoint}/infer", data=head + blob, headers=headers, timeout=30)


def test_malformed_parameters_and_binary_requests_are_400(deployed, trained):
    rows = trained.val_x[:2]
    blob = rows.tobytes()
    one = {"name": "input", "shape": [2, 64], "datatype": "FP32", "parameters": {"binary_data_size": len(blob)}}

    def body(**changes):
        return {"inputs": [one], **changes}

    cases = [
        ("parameters a string", body(parameters="fast"), blob, "auto"),
        ("parameters a list", body(parameters=[1]), blob, "auto"),
        ("parameter value a list", body(parameters={"k": [1]}), blob, "auto"),
        ("binary_data_output not a boolean", body(parameters={"binary_data_output": "yes"}), blob, "auto"),
        ("output binary_data not a boolean", body(outputs=[{"name": "label", "parameters": {"binary_data": 1}}]),
         blob, "auto"),
        ("output parameters a string", body(outputs=[{"name": "label", "parameters": "x"}]), blob, "auto"),
        ("classification extension", body(outputs=[{"name": "label", "parameters": {"classification": 2}}]),
         blob, "auto"),
        ("shared memory extension", {"inputs": [{**one, "parameters": {"shared_memory_region": "r"}}]}, b"", "auto"),
        ("input parameters a list", {"inputs": [{**one, "parameters": [len(blob)]}]}, blob, "auto"),
        ("binary_data_size negative", {"inputs": [{**one, "parameters": {"binary_data_size": -1}}]}, blob, "auto"),
        ("binary_data_size a string", {"inputs": [{**one, "parameters": {"binary_data_size": "1024"}}]}, blob, "auto"),
        ("binary_data_size and data", {"inputs": [{**one, "data": [0.0] * 128}]}, blob, "auto"),
        ("binary_data_size short of the bytes", body(), blob + b"\0" * 4, "auto"),
        ("bytes short of binary_data_size", body(), blob[:-4], "auto"),
        ("binary_data_size not the shape's", {"inputs": [{**one, "shape": [1, 64]}]}, blob, "auto"),
        ("header length past the body", body(), blob, 10**6),
        ("header length zero", body(), blob, 0),
        ("header length not a number", body(), blob, "12a"),
        ("header length cuts the JSON", body(), blob, 10),
        ("no header length", body(), blob, None),
    ]
    for kind, header, data, length in cases:
        response = raw_infer(deployed, header, data, length=length)
        assert response.status_code == 400, f"{kind}: {response.status_code} {response.text}"
        assert response.json()["error"], kind
    ok = raw_infer(deployed, body(id="raw-1", parameters={"binary_data_output": True, "note": "x"}), blob)
    assert ok.status_code == 200, ok.text
    length = int(ok.headers["Inference-Header-Content-Length"])
    header = json.loads(ok.content[:length])
    assert header["id"] == "raw-1" and [o["parameters"]["binary_data_size"] for o in header["outputs"]] == [80, 16]
    labels = np.frombuffer(ok.content[length + 80:], dtype="<i8")
    np.testing.assert_array_equal(labels, trained.expected[:2])


def test_model_names_and_versions_outside_ascii_are_4xx(deployed):
    """Path parameters are any text a URL can spell: a name or version the registry cannot hold is
    a 404 (or 400), never a 5xx. (Found by the schemathesis test below.)"""
    body = infer_body(np.zeros((1, 64), np.float32))
    cases = [
        ("POST", f"{deployed.base_url}/v2/models/%C3%8Dr/infer"),  # "Ír"
        ("POST", f"{deployed.base_url}/v2/models/%E6%A8%A1%E5%9E%8B/infer"),  # "模型": not even Latin-1
        ("POST", f"{deployed.base_url}/v2/models/a%11b/infer"),  # ASCII, with a control character
        ("POST", f"{deployed.base_url}/v2/models/a%11b/versions/1/infer"),
        ("POST", f"{deployed.base_url}/v2/models/d%C3%AFgits/versions/1/infer"),
        ("GET", f"{deployed.base_url}/v2/models/%C3%8Dr"),
        ("GET", f"{deployed.endpoint}/versions/%C2%B2"),  # "²": str.isdigit() holds, int() refuses it
        ("GET", f"{deployed.endpoint}/versions/%C2%B2/ready"),
        ("POST", f"{deployed.endpoint}/versions/%C2%B2/infer"),
    ]
    wrong = []
    for method, url in cases:
        response = requests.request(method, url, json=body if method == "POST" else None,
                                    headers=auth(deployed.api_key), timeout=30)
        if not (400 <= response.status_code < 500 and _is_error_body(response)):
            wrong.append(f"{method} {url.removeprefix(deployed.base_url)} -> {response.status_code} {response.text}")
    assert not wrong, "\n".join(wrong)


# -- what the server lists and documents -----------------------------------------------------------


def test_model_list_repository_index_and_server_metadata(deployed, v2):
    assert {MODEL, "other_digits"} <= set(v2.models())
    assert requests.get(f"{deployed.base_url}/v2/models", timeout=10).status_code == 401
    for body in (None, {}, {"ready": True}):
        response = requests.post(f"{deployed.base_url}/v2/repository/index", json=body,
                                 headers=auth(deployed.api_key), timeout=10)
        assert response.status_code == 200, response.text
        index = {(entry["name"], entry["version"]): entry for entry in response.json()}
        assert {(MODEL, "1"), (MODEL, "2"), ("other_digits", "1")} <= set(index)
        assert {entry["state"] for entry in index.values()} == {"READY"}
        assert index[(MODEL, "1")]["reason"] == "routed"
    server = v2.server_metadata()
    assert server == {"name": "orchestrator", "version": project_version(), "extensions": ["binary_tensor_data"]}
    assert server["version"] != "unknown"


INFER_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")


def test_openapi_documents_bearer_keys_and_both_infer_bodies(deployed):
    document = requests.get(f"{deployed.base_url}/openapi.json", timeout=10).json()
    bearer = document["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer") and "Authorization: Bearer" in bearer["description"]
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            keyed = path not in ("/v2", "/v2/health/live", "/v2/health/ready")
            assert (operation.get("security") == [{"bearer": []}]) == keyed, f"{method} {path}"
            if keyed:
                assert {"401", "403"} <= set(operation["responses"]), f"{method} {path}"
    for path in INFER_PATHS:
        operation = document["paths"][path]["post"]
        content = operation["requestBody"]["content"]
        assert set(content) == {"application/json", "application/octet-stream"}
        assert set(content["application/json"]["schema"]["properties"]) >= {"id", "inputs", "outputs", "parameters"}
        assert "Inference-Header-Content-Length" in [p["name"] for p in operation["parameters"]]
        assert set(operation["responses"]["200"]["content"]) == {"application/json", "application/octet-stream"}
    metadata = document["paths"]["/v2/models/{name}"]["get"]["responses"]["200"]["content"]["application/json"]
    assert metadata["schema"] == {"$ref": "#/components/schemas/ModelMetadataResponse"}
    assert {"name", "platform", "inputs", "outputs"} <= set(document["components"]["schemas"]
                                                            ["ModelMetadataResponse"]["properties"])
    assert requests.get(f"{deployed.base_url}/docs", timeout=10).status_code == 200


# -- a schema-driven fuzzer: schemathesis on the served /openapi.json --------------------------------


def signature_document(document: Dict[str, Any], metadata: Dict[str, Any], refs: Sequence[str]) -> Dict[str, Any]:
    """The served OpenAPI document narrowed to bodies that fit `metadata`'s one [-1, F] input and to
    path parameters that exist (model names, version `refs`), so the fuzzer also reaches the model."""
    narrowed = copy.deepcopy(document)
    (tensor,) = metadata["inputs"]
    features = tensor["shape"][1]
    for operations in narrowed["paths"].values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    names = [metadata["name"], "other_digits"] if parameter["name"] == "name" else list(refs)
                    parameter["schema"] = {"type": "string", "enum": names}
    for path in INFER_PATHS:
        operation = narrowed["paths"][path]["post"]
        operation["parameters"] = [p for p in operation["parameters"] if p["in"] == "path"]
        content = operation["requestBody"]["content"]
        body = content["application/json"]["schema"]
        operation["requestBody"]["content"] = {"application/json": content["application/json"]}
        body["properties"]["inputs"].update(minItems=1, maxItems=1)
        item = body["properties"]["inputs"]["items"]
        item["required"] = ["name", "shape", "datatype", "data"]
        item["properties"].update(
            name={"const": tensor["name"]}, shape={"enum": [[1, features], [features], [1, 1, 8, 8]]},
            datatype={"enum": ["FP32", "FP16", "FP64", "BF16"]},
            data={"type": "array", "minItems": features, "maxItems": features,
                  "items": {"type": "number", "minimum": -4, "maximum": 4}},
        )
        outputs = body["properties"]["outputs"]["anyOf"][0]["items"]
        outputs["properties"]["name"] = {"enum": [o["name"] for o in metadata["outputs"]]}
    return narrowed


def fuzz(schema, modes: Sequence[str], *, base_url: str, key: str, examples: int) -> SimpleNamespace:
    """Send `examples` cases per operation of `schema` and generation mode ("positive", "negative")
    with `key`, checking each answer with schemathesis's not_a_server_error. Returns the statuses
    seen by operation, and the failures and non-JSON error bodies by (operation, status, body)."""
    tally = SimpleNamespace(statuses=Counter(), failures={}, not_json={}, unsendable=0)
    with requests.Session() as session:
        for result in schema.get_all_operations():
            for mode in modes:
                strategy = result.ok().as_strategy(generation_mode=GenerationMode(mode))
                send = given(case=strategy)(lambda case: _send(case, session, base_url, auth(key), tally))
                try:
                    settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])(send)()
                except Unsatisfiable:  # negative mode with nothing to make invalid (no parameters, no body)
                    pass
    return tally


def _send(case, session: requests.Session, base_url: str, headers: Dict[str, str], tally: SimpleNamespace) -> None:
    label = case.operation.label
    try:
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
    except (requests.exceptions.InvalidHeader, requests.exceptions.InvalidURL, UnicodeError):
        tally.unsendable += 1  # requests refuses to send it: nothing reached the server
        return
    tally.statuses[(label, response.status_code)] += 1
    fault = re.match(r'\{"error":"internal error: (\w+)', response.text)  # one kind per exception type
    kind = (label, response.status_code, fault.group(1) if fault else response.text[:80])
    example = f"{response.request.method} {response.request.url} ({len(response.request.body or b'')} body bytes)"
    try:
        case.validate_response(response, checks=[not_a_server_error])
    except FailureGroup:  # what the check found, kept (once per kind) with a request that caused it
        tally.failures.setdefault(kind, example)
    if response.status_code >= 400 and not _is_error_body(response):
        tally.not_json.setdefault(kind, example)


def _listed_failures(found: Dict[Tuple[str, int, str], str]) -> str:
    return "\n".join(f"{label} -> {status} {text!r}\n    e.g. {example}"
                     for (label, status, text), example in found.items())


def _is_error_body(response: requests.Response) -> bool:
    try:
        return isinstance(response.json()["error"], str)
    except (ValueError, KeyError, TypeError):
        return False


@pytest.mark.slow
def test_schemathesis_on_the_served_openapi_finds_no_5xx(deployed, keys):
    """Every route of /openapi.json, path parameters included, fuzzed with an infer-only key (admin
    routes answer 403, so the rollout state other tests rely on stays as it is)."""
    url = f"{deployed.base_url}/openapi.json"
    started = time.monotonic()
    served = schemathesis.openapi.from_url(url, timeout=10)
    operations = {op.ok().label for op in served.get_all_operations()}
    assert len(operations) == 15 and "POST /v2/models/{name}/infer" in operations, operations
    free = fuzz(served, ["positive", "negative"], base_url=deployed.base_url, key=keys.infer, examples=25)
    metadata = requests.get(deployed.endpoint, headers=auth(keys.infer), timeout=10).json()
    narrowed = schemathesis.openapi.from_dict(
        signature_document(requests.get(url, timeout=10).json(), metadata, ["1", "2", "production", "latest", "9"]))
    # Negative cases of the narrowed document are malformed bodies sent to models that exist: the parser's turn.
    fitted = fuzz(narrowed, ["positive", "negative"], base_url=deployed.base_url, key=keys.infer, examples=25)
    elapsed = time.monotonic() - started

    statuses = free.statuses + fitted.statuses
    failures, not_json = {**free.failures, **fitted.failures}, {**free.not_json, **fitted.not_json}
    model_answers = sum(n for (label, status), n in fitted.statuses.items() if "infer" in label and status == 200)
    admin = Counter({status: n for (label, status), n in statuses.items() if "/admin/" in label})
    problems = [
        *([f"{len(failures)} kinds of 5xx:\n{_listed_failures(failures)}"] if failures else []),
        *([f"error bodies without a JSON 'error':\n{_listed_failures(not_json)}"] if not_json else []),
        *([f"operations never sent: {operations - {label for label, _ in statuses}}"]
          if {label for label, _ in statuses} != operations else []),
        # Admin routes answer the infer-only key 403, whatever else is wrong with the request (the
        # negative mode leaves the Authorization header out sometimes: 401).
        *([f"admin routes answered {admin}"] if set(admin) - {401, 403, 404} else []),  # 401: the key left out
        # The narrowed document makes bodies that fit the model: the fuzzer reached it, not only the parser.
        *([f"only {model_answers} infer cases reached the model: {fitted.statuses}"] if model_answers < 20 else []),
        *([f"{free.unsendable} cases could not be sent"] if free.unsendable > sum(free.statuses.values()) / 10 else []),
        *([f"only {sum(statuses.values())} requests"] if sum(statuses.values()) < 1000 else []),
        *([f"the fuzzer took {elapsed:.0f} s"] if elapsed > 90 else []),
    ]
    print(f"schemathesis: {sum(statuses.values())} requests in {elapsed:.1f} s, {model_answers} answered by the "
          f"model from the narrowed document; statuses {dict(statuses)}")
    assert not problems, "\n".join(problems)


def test_replicas_share_one_weights_copy(deployed):
    handle = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=APP)
    infos = {}
    for _ in range(5):  # bursts of held calls reach both replicas
        for response in [handle.weights_info.remote(MODEL, 1, hold_s=1.0) for _ in range(40)]:
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
