"""Prometheus metrics of the serving app, per model and version.

Recorded with `ray.serve.metrics` inside the replicas; Ray exports them (prefixed `ray_`) on each
node's metrics endpoint (`ray start --metrics-export-port`, or the port `ray.init` picked), which
Prometheus scrapes as it scrapes any Ray cluster. Serve adds deployment, replica and app tags.

ray.serve.metrics annotates `tag_keys` as `Tuple[str]` (exactly one key) though it takes any number:
hence the `type: ignore[arg-type]` on each.
"""

from typing import List, Optional

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
