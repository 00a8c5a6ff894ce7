"""Promotion policies without Ray: which alias a new version takes, and why, against a real registry."""

from __future__ import annotations

import numpy as np
import pytest
from hydra.errors import ConfigCompositionException

from orchestrator.config import PromoteMode, RegistryConfig, to_config
from orchestrator.registry import ModelRegistry, signature_for
from orchestrator.registry.promotion import (
    CANDIDATE_ALIAS,
    Contender,
    PromoteIfBetter,
    decide,
    held_out_metric,
    make_policy,
)

DIGEST = "a" * 64


class Classifier:
    selection_metric, selection_mode = "val_accuracy", "max"


class LanguageModel:
    selection_metric, selection_mode = "val_loss", "min"


def _new(metrics, digest=DIGEST) -> Contender:
    return Contender(version=None, metrics=metrics, data_digest=digest)


def _held(accuracy, digest=DIGEST, version=2) -> Contender:
    return Contender(version=version, metrics={"test_accuracy": accuracy}, data_digest=digest)


def _better(margin=0.0, mode="max", metric="test_accuracy") -> PromoteIfBetter:
    return PromoteIfBetter("production", metric=metric, mode=mode, margin=margin)


def test_the_test_metric_follows_the_tasks_selection_metric():
    assert held_out_metric("val_accuracy") == "test_accuracy"
    assert held_out_metric("val_bits_per_byte") == "test_bits_per_byte"


def test_better_promotes_when_nothing_holds_the_alias():
    decision = _better().decide(_new({"test_accuracy": 0.2}), None)
    assert (decision.promoted, decision.alias, decision.against) == (True, "production", None)
    assert "no version holds 'production' yet" in decision.reason


def test_better_promotes_a_higher_test_accuracy_and_holds_a_lower_or_equal_one():
    better = _better().decide(_new({"test_accuracy": 0.95}), _held(0.90))
    assert (better.promoted, better.alias, better.against) == (True, "production", 2)
    assert better.reason == ("test_accuracy 0.9500 against production v2's 0.9000: better by 0.0500 "
                             "(margin 0.0000)")
    for accuracy in (0.85, 0.90):
        held = _better().decide(_new({"test_accuracy": accuracy}), _held(0.90))
        assert (held.promoted, held.alias) == (False, CANDIDATE_ALIAS)
        assert "not better by more than the margin 0.0000" in held.reason


def test_the_margin_must_be_exceeded_not_met():
    policy = _better(margin=0.05)
    assert not policy.decide(_new({"test_accuracy": 0.95}), _held(0.90)).promoted  # exactly the margin
    assert not policy.decide(_new({"test_accuracy": 0.94}), _held(0.90)).promoted
    assert policy.decide(_new({"test_accuracy": 0.96}), _held(0.90)).promoted


def test_a_min_metric_is_better_when_lower():
    policy = _better(mode="min", metric="test_loss")
    old = Contender(version=4, metrics={"test_loss": 2.0}, data_digest=DIGEST)
    assert policy.decide(_new({"test_loss": 1.8}), old).promoted
    assert not policy.decide(_new({"test_loss": 2.2}), old).promoted


def test_different_test_data_is_not_comparable():
    decision = _better().decide(_new({"test_accuracy": 0.99}), _held(0.50, digest="b" * 64))
    assert (decision.promoted, decision.alias) == (False, CANDIDATE_ALIAS)
    assert f"not comparable: production v2 was tested on data {'b' * 12}, this version on {'a' * 12}" in decision.reason


def test_an_incumbent_without_a_test_metric_is_not_comparable():
    old = Contender(version=1, metrics={"val_accuracy": 0.5}, data_digest=DIGEST)
    decision = _better().decide(_new({"test_accuracy": 0.99}), old)
    assert not decision.promoted and "production v1 records no test_accuracy" in decision.reason


@pytest.mark.parametrize(("mode", "promoted", "alias"), [
    (PromoteMode.always, True, "production"),
    (PromoteMode.never, False, CANDIDATE_ALIAS),
])
def test_always_and_never_ignore_the_metrics(mode, promoted, alias):
    policy = make_policy(RegistryConfig(promote=mode), "val_accuracy", "max")
    for incumbent in (None, _held(0.99), _held(0.01, digest="c" * 64)):
        decision = policy.decide(_new({"test_accuracy": 0.5}), incumbent)
        assert (decision.promoted, decision.alias) == (promoted, alias)
        assert f"registry.promote={mode.value}" in decision.reason


def test_make_policy_reads_the_margin_and_the_task_direction():
    policy = make_policy(RegistryConfig(promote_margin=0.02), "val_loss", "min")
    assert isinstance(policy, PromoteIfBetter)
    assert (policy.metric, policy.mode, policy.margin, policy.alias) == ("test_loss", "min", 0.02, "production")


# --- decide(): the aliased version read from a real registry --------------------------------------------


def _register(registry: ModelRegistry, accuracy: float, digest: str = DIGEST) -> int:
    weights = {"head.weight": np.zeros((2, 2), dtype=np.float32)}
    version = registry.register("digits", weights, metrics={"test_accuracy": accuracy}, config={},
                                lineage={"data_digest": digest}, signature=signature_for([2], 2))
    return version.version


def test_decide_compares_with_the_version_the_alias_points_at(tmp_path):
    registry = ModelRegistry(tmp_path.as_uri())
    cfg = RegistryConfig()
    assert decide(registry, cfg, Classifier(), metrics={"test_accuracy": 0.5}, data_digest=DIGEST).promoted
    first, second = _register(registry, 0.80), _register(registry, 0.95)
    registry.set_alias("digits", "production", first)  # production: the weaker v1, v2 is newer and better
    decision = decide(registry, cfg, Classifier(), metrics={"test_accuracy": 0.85}, data_digest=DIGEST)
    assert decision.promoted and decision.against == first
    registry.set_alias("digits", "production", second)
    decision = decide(registry, cfg, Classifier(), metrics={"test_accuracy": 0.85}, data_digest=DIGEST)
    assert not decision.promoted and decision.against == second
    assert decision.record() == {"promoted": False, "alias": CANDIDATE_ALIAS, "reason": decision.reason,
                                 "against": second}
    assert decision.message("digits", 3).startswith("digits v3 not promoted, aliased 'candidate': test_accuracy 0.85")


def test_decide_with_no_promote_alias_moves_no_alias(tmp_path):
    decision = decide(ModelRegistry(tmp_path.as_uri()), RegistryConfig(promote_alias=""), LanguageModel(),
                      metrics={}, data_digest=DIGEST)
    assert (decision.promoted, decision.alias) == (False, "")


def test_promote_settings_compose_and_a_bad_choice_fails_naming_the_choices(compose):
    cfg = to_config(compose(["registry.promote=never", "registry.promote_margin=0.02"]))
    assert (cfg.registry.promote, cfg.registry.promote_margin) == (PromoteMode.never, 0.02)
    assert to_config(compose([])).registry.promote == PromoteMode.better
    with pytest.raises(ConfigCompositionException):
        compose(["registry.promote=sometimes"])
    with pytest.raises(ValueError, match=r"registry\.promote must be one of \['better', 'always', 'never'\]"):
        RegistryConfig(promote="sometimes")  # type: ignore[arg-type]
