"""Which model-call failures the ingress sends again (a dead replica) and which it answers (the
model's own errors, timeouts, full queues), and the settings of replica replacement; no Ray started."""

import asyncio

import pytest
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError
from ray.serve.exceptions import BackPressureError

from orchestrator.config import ServeConfig
from serve.calls import replica_died


def test_only_a_dead_or_unreachable_replica_is_retried():
    assert replica_died(ActorDiedError())
    assert replica_died(ActorUnavailableError("replica unreachable", None))
    # The replica's own code failed, also when what failed was its call to another actor.
    assert not replica_died(RayTaskError("predict", "traceback", RuntimeError("bad model")).as_instanceof_cause())
    assert not replica_died(RayTaskError("predict", "traceback", ActorDiedError()).as_instanceof_cause())
    assert not replica_died(asyncio.TimeoutError())
    assert not replica_died(BackPressureError(num_queued_requests=9, max_queued_requests=8))


def test_replica_replacement_settings_are_validated():
    assert ServeConfig().health_check_period_s == 2.0 and ServeConfig().ingress_replicas == 1
    with pytest.raises(ValueError, match="serve.ingress_replicas"):
        ServeConfig(ingress_replicas=0)
    with pytest.raises(ValueError, match="serve.health_check_period_s"):
        ServeConfig(health_check_period_s=0)
