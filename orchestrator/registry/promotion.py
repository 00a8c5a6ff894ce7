"""Promotion: whether a newly registered version takes the serving alias (`registry.promote_alias`).

A version is registered whatever the decision; the decision only says which alias it takes:
`registry.promote_alias` (production) when promoted, `CANDIDATE_ALIAS` otherwise. Policies
(`registry.promote`):

  better   promoted when nothing holds the alias yet, or when it beats the version that does on the
           same test data (same data digest) by more than `registry.promote_margin`, in the task's test
           metric (test_accuracy higher, test_loss lower). Different data is not comparable: not promoted.
  always   promoted.
  never    not promoted (a person promotes by moving the alias, or through a rollout).

Rollouts (serve.controller) move the alias themselves; nothing here runs there.

    decision = decide(registry, cfg.registry, task, metrics=metrics, data_digest=info.digest)
    version = registry.register(..., promotion=decision.record())
    if decision.alias:
        registry.set_alias(cfg.registry.model_name, decision.alias, version.version)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Protocol

from orchestrator.config import PromoteMode, RegistryConfig
from orchestrator.registry.store import ModelRegistry, ModelVersion

CANDIDATE_ALIAS = "candidate"
"""The alias a registered version takes when it is not promoted (the newest such version holds it)."""
_EPSILON = 1e-9
"""Metrics are ratios of counts: an improvement equal to the margin must not pass by float rounding."""


@dataclass(frozen=True, kw_only=True)
class Contender:
    """What a promotion compares of one version: its metrics and the data they were measured on."""

    version: Optional[int]
    """Its registry version; None for the version being registered."""
    metrics: Mapping[str, Any]
    data_digest: Optional[str]
    """The dataset's digest (`DatasetInfo.digest`, the manifest's lineage.data_digest)."""

    @classmethod
    def of(cls, version: ModelVersion) -> Contender:
        return cls(version=version.version, metrics=version.metrics,
                   data_digest=version.manifest.get("lineage", {}).get("data_digest"))


@dataclass(frozen=True, kw_only=True)
class Decision:
    """Whether the new version is promoted, the alias it takes, and why, in words."""

    promoted: bool
    alias: str
    """`registry.promote_alias` when promoted, `CANDIDATE_ALIAS` when not, '' when no alias moves."""
    reason: str
    against: Optional[int] = None
    """The version that held the alias when the decision was made (None: none did)."""

    def record(self) -> Dict[str, Any]:
        """The decision as the manifest and the job's summary line keep it."""
        return {"promoted": self.promoted, "alias": self.alias, "reason": self.reason, "against": self.against}

    def message(self, model: str, version: int) -> str:
        """One line: what became of `model` v`version`, and why."""
        verdict = "promoted" if self.promoted else "not promoted"
        took = f", aliased {self.alias!r}" if self.alias else ""
        return f"{model} v{version} {verdict}{took}: {self.reason}"


class SelectingTask(Protocol):
    """What promotion reads of a task (`orchestrator.training.tasks.Task`, which imports torch)."""

    selection_metric: str
    """e.g. 'val_accuracy': promotion compares its test version, 'test_accuracy'."""
    selection_mode: str
    """'max' or 'min'."""


class PromotionPolicy:
    """Decides whether a new version takes `alias` from the version that holds it (`incumbent`)."""

    def __init__(self, alias: str):
        self.alias = alias

    def decide(self, new: Contender, incumbent: Optional[Contender]) -> Decision:
        raise NotImplementedError

    def _promote(self, reason: str, incumbent: Optional[Contender]) -> Decision:
        return Decision(promoted=True, alias=self.alias, reason=reason, against=_number(incumbent))

    def _hold(self, reason: str, incumbent: Optional[Contender]) -> Decision:
        return Decision(promoted=False, alias=CANDIDATE_ALIAS, reason=reason, against=_number(incumbent))


class AlwaysPromote(PromotionPolicy):
    def decide(self, new, incumbent):
        return self._promote("registry.promote=always", incumbent)


class NeverPromote(PromotionPolicy):
    def decide(self, new, incumbent):
        return self._hold(f"registry.promote=never: {self.alias!r} stays where it is", incumbent)


class PromoteIfBetter(PromotionPolicy):
    """Promotes a version that beats the incumbent's `metric` on the same data by more than `margin`."""

    def __init__(self, alias: str, *, metric: str, mode: str, margin: float):
        super().__init__(alias)
        self.metric, self.mode, self.margin = metric, mode, margin

    def decide(self, new, incumbent):
        if incumbent is None:
            return self._promote(f"no version holds {self.alias!r} yet", incumbent)
        held = f"{self.alias} v{incumbent.version}"
        if self.metric not in new.metrics:
            return self._hold(f"this version has no {self.metric} to compare with {held}'s", incumbent)
        if self.metric not in incumbent.metrics:
            return self._hold(f"not comparable: {held} records no {self.metric} "
                              "(registry.promote=always promotes anyway)", incumbent)
        if new.data_digest != incumbent.data_digest:
            return self._hold(f"not comparable: {held} was tested on data {_short(incumbent.data_digest)}, this "
                              f"version on {_short(new.data_digest)} (registry.promote=always promotes anyway)",
                              incumbent)
        value, before = float(new.metrics[self.metric]), float(incumbent.metrics[self.metric])
        gain = value - before if self.mode == "max" else before - value
        compared = f"{self.metric} {value:.4f} against {held}'s {before:.4f}"
        if gain - self.margin > _EPSILON:
            return self._promote(f"{compared}: better by {gain:.4f} (margin {self.margin:.4f})", incumbent)
        return self._hold(f"{compared}: not better by more than the margin {self.margin:.4f}", incumbent)


def held_out_metric(selection_metric: str) -> str:
    """The test-split name of a task's selection metric: 'val_accuracy' -> 'test_accuracy'."""
    return "test_" + selection_metric.removeprefix("val_")


def make_policy(cfg: RegistryConfig, selection_metric: str, selection_mode: str) -> PromotionPolicy:
    """The policy `cfg.promote` names, comparing the test version of the task's selection metric."""
    if cfg.promote == PromoteMode.always:
        return AlwaysPromote(cfg.promote_alias)
    if cfg.promote == PromoteMode.never:
        return NeverPromote(cfg.promote_alias)
    return PromoteIfBetter(cfg.promote_alias, metric=held_out_metric(selection_metric), mode=selection_mode,
                           margin=cfg.promote_margin)


def holder(registry: ModelRegistry, model: str, alias: str) -> Optional[Contender]:
    """The version `alias` points at, or None when it points nowhere yet."""
    number = registry.aliases(model).get(alias) if registry.versions(model) else None
    return None if number is None else Contender.of(registry.get(model, number))


def decide(registry: ModelRegistry, cfg: RegistryConfig, task: SelectingTask, *, metrics: Mapping[str, Any],
           data_digest: str) -> Decision:
    """Whether a version of `cfg.model_name` with `metrics` on data `data_digest` takes `cfg.promote_alias`.

    Reads the registry only; the caller registers the version and sets `decision.alias`. Raises
    IntegrityError when the aliased version's manifest does not match its checksum.
    """
    if not cfg.promote_alias:
        return Decision(promoted=False, alias="", reason="registry.promote_alias is empty: no alias moves")
    policy = make_policy(cfg, task.selection_metric, task.selection_mode)
    new = Contender(version=None, metrics=metrics, data_digest=data_digest)
    return policy.decide(new, holder(registry, cfg.model_name, cfg.promote_alias))


def _number(contender: Optional[Contender]) -> Optional[int]:
    return None if contender is None else contender.version


def _short(digest: Optional[str]) -> str:
    return digest[:12] if digest else "(unrecorded)"
