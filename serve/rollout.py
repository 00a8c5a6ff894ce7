"""Rollout state of served models: a stable version, an optional canary candidate with a traffic
share, promotion, rollback, and the policy that rolls a failing candidate back by itself.

Pure (no Ray): the `RolloutController` deployment in serve.controller owns one `RouteTable`
and calls it once per admin action or per batch of outcomes reported by the ingress replicas.
"""

from __future__ import annotations

import collections
import enum
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

from orchestrator.config import RolloutConfig

Outcome = Tuple[str, int, bool, float]
"""(model, version, ok, latency_ms) of one request; ok is False for a 5xx or a timeout. The latency of a
completion is its time to first token."""


class Decision(enum.Enum):
    KEEP = "keep"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    reason: str


class RollbackPolicy:
    """Judges a candidate on its requests in the window: too many failures or too slow a p99 -> ROLLBACK.
    A classifier's p99 latency is held to `max_p99_ms`; a language model's p99 time to first token to
    `max_p99_ttft_ms` (its v2 infer passes count as such: one prefill each)."""

    def __init__(self, cfg: RolloutConfig):
        self.cfg = cfg

    def decide(self, outcomes: Sequence[Tuple[bool, float]], *, generator: bool = False) -> Verdict:
        if not self.cfg.auto_rollback or len(outcomes) < self.cfg.min_requests:
            return Verdict(Decision.KEEP, f"{len(outcomes)} requests, judged from {self.cfg.min_requests}")
        errors = sum(1 for ok, _ in outcomes if not ok)
        error_rate = errors / len(outcomes)
        if error_rate > self.cfg.max_error_rate:
            return Verdict(Decision.ROLLBACK,
                           f"error rate {error_rate:.3f} over {len(outcomes)} requests > {self.cfg.max_error_rate}")
        p99 = percentile([latency for _, latency in outcomes], 99)
        limit = self.cfg.max_p99_ttft_ms if generator else self.cfg.max_p99_ms
        what = "time to first token" if generator else "latency"
        if p99 > limit:
            return Verdict(Decision.ROLLBACK, f"p99 {what} {p99:.1f} ms over {len(outcomes)} requests > {limit} ms")
        return Verdict(Decision.KEEP,
                       f"error rate {error_rate:.3f}, p99 {what} {p99:.1f} ms over {len(outcomes)} requests")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (no interpolation: the value some request really saw)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


class RolloutError(Exception):
    """An admin action that does not apply to the current state (e.g. promote with no candidate)."""


@dataclass(kw_only=True)
class Route:
    """How one model's unversioned requests are split."""

    stable: int
    """The production version."""
    candidate: Optional[int] = None
    """A version receiving `percent` of the traffic beside `stable`, or None."""
    percent: float = 0.0
    """Share (0-100) of unversioned requests sent to the candidate."""
    history: List[int] = field(default_factory=list)
    """Earlier stable versions, newest last: what a rollback with no candidate returns to."""

    def pick(self, draw: float) -> int:
        """The version serving a request, for a uniform `draw` in [0, 1)."""
        if self.candidate is not None and draw * 100 < self.percent:
            return self.candidate
        return self.stable


class RouteTable:
    """Rollout state of every served model, changed one step at a time."""

    def __init__(self, policy: RollbackPolicy, *, clock: Callable[[], float] = time.monotonic):
        self.routes: Dict[str, Route] = {}
        self.events: List[dict] = []
        self._policy, self._clock = policy, clock
        self._windows: Dict[str, Deque[Tuple[float, bool, float]]] = {}
        self._generators: Dict[str, bool] = {}
        """model -> whether its candidate is a language model (judged on time to first token)."""

    def add(self, model: str, stable: int) -> None:
        if model not in self.routes:
            self.routes[model] = Route(stable=stable)

    def start(self, model: str, candidate: int, percent: float, *, generator: bool = False) -> Route:
        """Send `percent` of `model`'s traffic to `candidate` (replacing any other candidate); `generator`:
        the candidate is a language model."""
        route = self._route(model)
        if not 0 <= percent <= 100:
            raise RolloutError(f"percent must be in [0, 100], got {percent}")
        if candidate == route.stable:
            raise RolloutError(f"version {candidate} is already the stable version of {model!r}")
        if route.candidate != candidate:
            self._windows[model] = collections.deque()  # a new candidate is judged afresh
        route.candidate, route.percent = candidate, float(percent)
        self._generators[model] = generator
        self._log(model, "start", candidate=candidate, percent=percent)
        return route

    def promote(self, model: str) -> Route:
        """Make the candidate the stable version; the old stable joins the history."""
        route = self._route(model)
        if route.candidate is None:
            raise RolloutError(f"model {model!r} has no candidate to promote")
        route.history.append(route.stable)
        route.stable, route.candidate, route.percent = route.candidate, None, 0.0
        self._log(model, "promote", stable=route.stable)
        return route

    def rollback(self, model: str, older: Callable[[int], Optional[int]], reason: str = "requested") -> Route:
        """Drop the candidate; with none, return to the previous stable version (`older(v)` names
        the version before v when the history is empty)."""
        route = self._route(model)
        if route.candidate is not None:
            dropped, route.candidate, route.percent = route.candidate, None, 0.0
            self._log(model, "rollback", dropped=dropped, stable=route.stable, reason=reason)
            return route
        previous = route.history.pop() if route.history else older(route.stable)
        if previous is None:
            raise RolloutError(f"model {model!r} has no version before {route.stable} to roll back to")
        dropped, route.stable = route.stable, previous
        self._log(model, "rollback", dropped=dropped, stable=previous, reason=reason)
        return route

    def report(self, outcomes: Iterable[Outcome]) -> List[dict]:
        """Record candidate outcomes and roll back each candidate the policy rejects; the events of those rollbacks."""
        now = self._clock()
        for model, version, ok, latency_ms in outcomes:
            route = self.routes.get(model)
            if route is not None and route.candidate == version:
                self._windows.setdefault(model, collections.deque()).append((now, ok, latency_ms))
        return [event for model in list(self._windows) if (event := self._judge(model, now))]

    def status(self, model: str) -> dict:
        route = self._route(model)
        window = [(ok, latency) for _, ok, latency in self._windows.get(model, ())] if route.candidate else []
        verdict = self._policy.decide(window, generator=self._generators.get(model, False))
        return {"model": model, **asdict(route), "candidate_requests": len(window),
                "candidate_errors": sum(1 for ok, _ in window if not ok), "verdict": verdict.reason,
                "events": [e for e in self.events if e["model"] == model][-20:]}

    def _judge(self, model: str, now: float) -> Optional[dict]:
        window = self._windows[model]
        while window and window[0][0] < now - self._policy.cfg.window_s:
            window.popleft()
        route = self.routes[model]
        if route.candidate is None:
            return None
        verdict = self._policy.decide([(ok, latency) for _, ok, latency in window],
                                      generator=self._generators.get(model, False))
        if verdict.decision is not Decision.ROLLBACK:
            return None
        self.rollback(model, lambda _: None, reason=f"automatic: {verdict.reason}")
        window.clear()
        return self.events[-1]

    def _route(self, model: str) -> Route:
        if model not in self.routes:
            raise RolloutError(f"model {model!r} is not served")
        return self.routes[model]

    def _log(self, model: str, action: str, **details) -> None:
        self.events.append({"model": model, "action": action, "at": time.time(), **details})
