"""The optimize report: size on disk, parameters, non-zero parameters, test accuracy and CPU latency
of the parent and of every variant, as Markdown and CSV under the storage root."""

from __future__ import annotations

import csv
import dataclasses
import io
import statistics
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from orchestrator.optimize.quantize import int8_parameter_values
from orchestrator.registry import storage
from orchestrator.registry.servable import INT8_VARIANTS, build_servable, meta_model
from orchestrator.registry.store import weights_to_bytes

LATENCY_BATCHES = (1, 32)
WARMUP = 3


@dataclass(frozen=True, kw_only=True)
class VariantReport:
    """One row of the report."""

    name: str
    """'parent' or the method."""
    status: str
    """'parent', 'registered' or 'rejected'."""
    version: Optional[int]
    """Registry version (None for a rejected variant)."""
    size_bytes: int
    """Bytes of the weights file as the registry stores it."""
    parameters: int
    """Weights and biases (quantization scales and zero points not counted)."""
    nonzero: int
    """Parameters that are not zero."""
    test_accuracy: float
    """Accuracy on the test split (what the gate compares)."""
    accuracy_drop: float
    """Parent's test accuracy minus this one's (points are 100x)."""
    latency_ms_b1: float
    """Median CPU forward time at batch 1, one thread (as a serving replica runs)."""
    latency_ms_b32: float
    """Median CPU forward time at batch 32, one thread."""


def parameter_values(manifest: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    """The model's weights and biases, int8 ones offset by their zero point (zeros stay zeros)."""
    if (manifest.get("variant") or {}).get("method") in INT8_VARIANTS:
        return int8_parameter_values(arrays)
    names = {name for name, _ in meta_model(manifest).named_parameters()}
    return {name: arrays[name] for name in names}


def median_latency_ms(forward, rows: np.ndarray, repeats: int) -> float:
    """Median wall time of `forward` on `rows` with one intra-op thread, after a warm-up."""
    x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # serving replicas run one thread each (serve.replica.ModelServer)
    try:
        with torch.inference_mode():
            for _ in range(WARMUP):
                forward(x)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                forward(x)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return 1000.0 * statistics.median(times)


def latency_rows(features: np.ndarray, batch: int) -> np.ndarray:
    """`batch` rows of `features` (repeated when there are fewer)."""
    return np.resize(features, (batch, features.shape[1]))


def measure(
    manifest: Dict[str, Any], arrays: Dict[str, np.ndarray], features: np.ndarray, *, name: str, status: str,
    version: Optional[int], test_accuracy: float, parent_accuracy: float, repeats: int,
) -> VariantReport:
    """A report row for the model of `manifest` on `arrays`."""
    values = parameter_values(manifest, arrays)
    forward = build_servable(manifest, arrays)
    latency = {b: median_latency_ms(forward, latency_rows(features, b), repeats) for b in LATENCY_BATCHES}
    return VariantReport(
        name=name,
        status=status,
        version=version,
        size_bytes=len(weights_to_bytes(arrays)),
        parameters=int(sum(v.size for v in values.values())),
        nonzero=int(sum(np.count_nonzero(v) for v in values.values())),
        test_accuracy=test_accuracy,
        accuracy_drop=parent_accuracy - test_accuracy,
        latency_ms_b1=latency[1],
        latency_ms_b32=latency[32],
    )


def to_markdown(rows: List[VariantReport], title: str) -> str:
    parent = rows[0]
    lines = [
        f"## {title}", "",
        "| variant | version | status | size on disk (KiB) | parameters | non-zero | test accuracy | drop (points) "
        "| latency b1 (ms) | latency b32 (ms) | b1 vs parent | b32 vs parent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.name} | {r.version if r.version is not None else '-'} | {r.status} | {r.size_bytes / 1024:.1f} "
            f"| {r.parameters:,} | {r.nonzero:,} | {r.test_accuracy:.4f} | {100 * r.accuracy_drop:+.2f} "
            f"| {r.latency_ms_b1:.3f} | {r.latency_ms_b32:.3f} "
            f"| {r.latency_ms_b1 / parent.latency_ms_b1:.2f}x | {r.latency_ms_b32 / parent.latency_ms_b32:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def to_csv(rows: List[VariantReport]) -> str:
    buffer = io.StringIO()
    fields = [f.name for f in dataclasses.fields(VariantReport)]
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow(dataclasses.asdict(r))
    return buffer.getvalue()


def write_report(root: str, run_id: str, rows: List[VariantReport], title: str) -> Dict[str, str]:
    """Write report.md and report.csv under <root>/reports/optimize/<run_id>/; their URLs and the Markdown."""
    folder = storage.join(root, "reports", "optimize", run_id)
    markdown = to_markdown(rows, title)
    urls = {"markdown": storage.join(folder, "report.md"), "csv": storage.join(folder, "report.csv")}
    storage.write_bytes_atomic(urls["markdown"], markdown.encode())
    storage.write_bytes_atomic(urls["csv"], to_csv(rows).encode())
    return {**urls, "text": markdown}
