"""API keys (serve.auth) and rollout state (serve.rollout), without Ray or HTTP."""

import pytest

from orchestrator.config import AuthConfig, LimitsConfig, RolloutConfig, ServeConfig, to_config
from serve.auth import Authenticator, KeyStore
from serve.protocol import BadRequest
from serve.rollout import Decision, RollbackPolicy, RolloutError, RouteTable, percentile


@pytest.fixture
def store(tmp_path):
    return KeyStore(f"file://{tmp_path}/keys.json")


def status_of(auth: Authenticator, header, scope="infer") -> int:
    try:
        auth.check(header, scope)
        return 200
    except BadRequest as err:
        return err.status


def test_keys_are_checked_by_scope_and_revocation(store):
    infer_key, _ = store.create("app", ["infer"])
    admin_key, admin = store.create("ops", ["admin", "infer"])
    auth = Authenticator(store, ttl_s=0)
    assert status_of(auth, f"Bearer {infer_key}") == 200
    assert status_of(auth, f"Bearer {infer_key}", "admin") == 403
    assert status_of(auth, f"bearer {admin_key}", "admin") == 200
    assert status_of(auth, None) == 401 and status_of(auth, infer_key) == 401  # no "Bearer"
    assert status_of(auth, f"Bearer {infer_key[:-1]}x") == 401 and status_of(auth, "Bearer orc_zz_zz") == 401
    store.revoke(admin.id)
    assert status_of(auth, f"Bearer {admin_key}", "admin") == 401
    assert [k.revoked_at is None for k in store.list()] == [True, False]
    with pytest.raises(ValueError, match="scopes"):
        store.create("x", ["root"])
    with pytest.raises(KeyError):
        store.revoke("missing")


def test_authenticator_caches_the_store_for_its_ttl(store):
    key, record = store.create("app", ["infer"])
    auth = Authenticator(store, ttl_s=3600)
    assert status_of(auth, f"Bearer {key}") == 200
    store.revoke(record.id)
    assert status_of(auth, f"Bearer {key}") == 200  # still the cached copy: revocation lands within the TTL


def test_policy_judges_error_rate_and_p99_after_min_requests():
    policy = RollbackPolicy(RolloutConfig(min_requests=10, max_error_rate=0.1, max_p99_ms=100))
    assert policy.decide([(False, 1.0)] * 9).decision is Decision.KEEP  # too few to judge
    assert policy.decide([(True, 1.0)] * 8 + [(False, 1.0)] * 2).decision is Decision.ROLLBACK
    assert policy.decide([(True, 1.0)] * 98 + [(True, 500.0)] * 2).decision is Decision.ROLLBACK
    assert policy.decide([(True, 1.0)] * 99 + [(True, 500.0)]).decision is Decision.KEEP
    assert (
        RollbackPolicy(RolloutConfig(auto_rollback=False, min_requests=1)).decide([(False, 1.0)]).decision
        is Decision.KEEP
    )
    assert percentile([5, 1, 3, 2, 4], 50) == 3


def test_route_table_steps():
    table = RouteTable(RollbackPolicy(RolloutConfig(min_requests=2, max_error_rate=0.0)), clock=lambda: 0.0)
    table.add("m", 1)
    route = table.start("m", 2, 10)
    assert route.pick(0.05) == 2 and route.pick(0.5) == 1
    with pytest.raises(RolloutError):
        table.start("m", 1, 10)
    route = table.promote("m")
    assert (route.stable, route.candidate, route.history) == (2, None, [1])
    assert table.rollback("m", lambda v: None).stable == 1  # no candidate: back to the previous stable
    table.start("m", 3, 50)
    assert table.report([("m", 3, True, 1.0)]) == []
    (event,) = table.report([("m", 3, False, 1.0), ("m", 1, False, 1.0)])  # only the candidate is judged
    assert event["action"] == "rollback" and event["reason"].startswith("automatic")
    assert table.routes["m"].candidate is None and table.routes["m"].stable == 1
    with pytest.raises(RolloutError):
        table.promote("m")


def test_serve_config_sections_validate_and_rebuild_from_dicts():
    # Dicts on purpose (what a config read back from JSON holds): to_config builds the sections from them.
    sections = {"auth": {"enabled": False}, "limits": {"request_timeout_s": 2.0}, "min_replicas": 0}
    cfg = to_config({"serve": sections}).serve
    assert cfg.auth.enabled is False and cfg.limits.request_timeout_s == 2.0 and cfg.min_replicas == 0
    with pytest.raises(ValueError, match="serve.rollout.max_error_rate"):
        to_config({"serve": {"rollout": {"max_error_rate": 2}}})
    with pytest.raises(ValueError, match="serve.limits.max_pending_requests"):
        to_config({"serve": {"limits": {"max_pending_requests": 0}}})
    with pytest.raises(ValueError, match="serve.max_replicas"):
        ServeConfig(min_replicas=0, max_replicas=0)


def test_deploy_key_first_start_then_minted_then_from_env(tmp_path, monkeypatch, caplog):
    from orchestrator.client import API_KEY_ENV
    from orchestrator.config import PipelineConfig, StorageConfig
    from serve.auth import api_key_for_deploy

    monkeypatch.delenv(API_KEY_ENV, raising=False)
    cfg = PipelineConfig(storage=StorageConfig(root=str(tmp_path)))
    first = api_key_for_deploy(cfg)
    assert api_key_for_deploy(cfg, mint=False) is None  # a serve-config build never mints
    second = api_key_for_deploy(cfg)
    store = KeyStore(f"file://{tmp_path}/serving/api_keys.json")
    assert [k.scopes for k in store.list()] == [("infer", "admin"), ("infer",)]
    assert first != second and first.startswith("orc_") and second.startswith("orc_")
    monkeypatch.setenv(API_KEY_ENV, "orc_given_key")
    assert api_key_for_deploy(cfg) == "orc_given_key"
    open_cfg = PipelineConfig(storage=StorageConfig(root=str(tmp_path)),
                              serve=ServeConfig(auth=AuthConfig(enabled=False)))
    assert api_key_for_deploy(open_cfg) is None
    assert "serve.auth.enabled=false" in caplog.text


def test_serve_config_carries_every_setting_for_the_builder(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from orchestrator.config import PipelineConfig, StorageConfig
    from serve.app import config_from_args
    from serve.config_file import serve_config

    cfg = PipelineConfig(
        storage=StorageConfig(root=str(tmp_path)),
        serve=ServeConfig(port=8123, min_replicas=0, limits=LimitsConfig(request_timeout_s=5.0)),
    )
    (application,) = ServeDeploySchema(**serve_config(cfg)).applications
    rebuilt = config_from_args(application.args)
    assert rebuilt.serve == cfg.serve.__class__(**{**cfg.serve.__dict__, "port": 8000})
    assert rebuilt.storage.root == cfg.storage.root
