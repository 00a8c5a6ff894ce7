"""Prometheus metrics of the serving app, per model and version.

Recorded with `ray.serve.metrics` inside the replicas; Ray exports them (prefixed `ray_`) on each
node's metrics endpoint (`ray start --metrics-export-port`, or the port `ray.init` picked), which
Prometheus scrapes as it scrapes any Ray cluster. Serve adds deployment, replica and app tags.

ray.serve.metrics annotates `tag_keys` as `Tuple[str]` (exactly one key) though it takes any number:
hence the `type: ignore[arg-type]` on each.
"""

from typing import Dict, List, Optional, Tuple

LATENCY_BOUNDARIES_MS: List[float] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000]
BATCH_BOUNDARIES: List[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class IngressMetrics:
    """Requests, errors by status and latency of infer requests, tagged model/version/status."""

    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "orchestrator_requests", description="Infer requests answered, by model, version and HTTP status.",
            tag_keys=("model", "version", "status"),  # type: ignore[arg-type]  # see the module docstring
        )
        self.errors = metrics.Counter(
            "orchestrator_request_errors",
            description="Infer requests answered with a 4xx or 5xx, by model, version and HTTP status.",
            tag_keys=("model", "version", "status"),  # type: ignore[arg-type]  # see the module docstring
        )
        self.latency = metrics.Histogram(
            "orchestrator_request_latency_ms",
            description="Infer latency inside the serving replica (ms), by model and version.",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("model", "version"),  # type: ignore[arg-type]
        )

    def record(self, model: str, version: Optional[int], status: int, latency_ms: float) -> None:
        tags = {"model": model, "version": "none" if version is None else str(version)}
        self.requests.inc(tags={**tags, "status": str(status)})
        if status >= 400:
            self.errors.inc(tags={**tags, "status": str(status)})
        self.latency.observe(latency_ms, tags=tags)


class BatchMetrics:
    """Requests merged into each forward pass, by model and version."""

    def __init__(self):
        from ray.serve import metrics

        self.batch_size = metrics.Histogram(
            "orchestrator_batch_size", description="Requests per forward pass, by model and version.",
            boundaries=BATCH_BOUNDARIES, tag_keys=("model", "version"),  # type: ignore[arg-type]
        )

    def record(self, model: str, version: int, requests: int) -> None:
        self.batch_size.observe(requests, tags={"model": model, "version": str(version)})


class GenerationMetrics:
    """Language models: time to first token, inter-token latency, generated tokens (their rate is tokens/s),
    and the engine's running and waiting sequences (set after every engine step), by model and version."""

    def __init__(self):
        from ray.serve import metrics

        tags = ("model", "version")
        self.first_token = metrics.Histogram(
            "orchestrator_time_to_first_token_ms",
            description="Time from a completion request's arrival to its sequence's first token (ms).",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags,  # type: ignore[arg-type]  # see the module docstring
        )
        self.inter_token = metrics.Histogram(
            "orchestrator_inter_token_latency_ms",
            description="Time between a sequence's consecutive tokens (ms).",
            boundaries=LATENCY_BOUNDARIES_MS, tag_keys=tags,  # type: ignore[arg-type]
        )
        self.generated = metrics.Counter(
            "orchestrator_generated_tokens", description="Tokens generated, by model and version.",
            tag_keys=tags,  # type: ignore[arg-type]
        )
        self.running = metrics.Gauge(
            "orchestrator_running_sequences", description="Sequences decoding in this replica's engine.",
            tag_keys=tags,  # type: ignore[arg-type]
        )
        self.waiting = metrics.Gauge(
            "orchestrator_waiting_sequences", description="Sequences waiting for a slot in this replica's engine.",
            tag_keys=tags,  # type: ignore[arg-type]
        )
        self._sequences: Dict[Tuple[str, int], Tuple[int, int]] = {}
        """(model, version) -> the (running, waiting) last set."""

    def record_first_token(self, model: str, version: int, ms: float) -> None:
        self.first_token.observe(ms, tags=_tags(model, version))

    def record_tokens(self, model: str, version: int, tokens: int, gap_ms: Optional[float]) -> None:
        """`tokens` more tokens of one sequence, `gap_ms` after its previous ones (None: its first ones);
        tokens that came together share the gap."""
        if tokens < 1:  # an event may only flush held-back text
            return
        tags = _tags(model, version)
        self.generated.inc(tokens, tags=tags)
        if gap_ms is not None:
            for _ in range(tokens):
                self.inter_token.observe(gap_ms / tokens, tags=tags)

    def record_step(self, model: str, version: int, running: int, waiting: int) -> None:
        if self._sequences.get((model, version)) != (running, waiting):  # most steps change nothing
            tags = _tags(model, version)
            self.running.set(running, tags=tags)
            self.waiting.set(waiting, tags=tags)
            self._sequences[(model, version)] = (running, waiting)


def _tags(model: str, version: int) -> Dict[str, str]:
    return {"model": model, "version": str(version)}
