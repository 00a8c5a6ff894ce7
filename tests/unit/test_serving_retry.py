"""Settings of replica replacement and of the fast path's environment; no Ray started."""

import pytest

from orchestrator.config import ServeConfig
from orchestrator.runtime import RAY_ENV, SERVE_ENV


def test_replica_replacement_settings_are_validated():
    assert ServeConfig().health_check_period_s == 2.0
    with pytest.raises(ValueError, match="serve.health_check_period_s"):
        ServeConfig(health_check_period_s=0)


def test_the_fast_path_resends_requests_a_dying_replica_cut_off():
    # HAProxy retries only connection failures by default; a replica killed mid-request leaves an
    # empty response, which must be retried too (inference is idempotent).
    assert SERVE_ENV["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "empty-response" in SERVE_ENV["RAY_SERVE_HAPROXY_RETRY_ON"].split()
    assert all(RAY_ENV[key] == value for key, value in SERVE_ENV.items())
