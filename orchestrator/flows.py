"""The main flow: data -> sweep -> register -> deploy -> check, and the registration step shared by jobs."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

from orchestrator.client import check_endpoint
from orchestrator.config import BuiltinModel, PipelineConfig, to_config, to_dict
from orchestrator.optimize.run import OptimizeResult, run_optimize
from orchestrator.registry import promotion, storage
from orchestrator.registry.curves import CURVES_FILE, training_curves_png
from orchestrator.registry.store import ModelRegistry, ModelVersion, registry_for
from orchestrator.runtime import ensure_ray
from orchestrator.training.data import DatasetInfo, load_split, prepare_dataset
from orchestrator.training.loop import TrainResult, evaluate_checkpoint, load_state
from orchestrator.training.sweep import SweepResult, run_sweep
from orchestrator.training.tasks import Task, get_task, headline_metrics
from orchestrator.training.tracking import tag_registered_version
from serve.deploy import DeployResult, run_deploy

log = logging.getLogger(__name__)

CHECK_ROWS = 64


@dataclass(kw_only=True)
class PipelineResult:
    sweep: SweepResult
    version: ModelVersion
    deployment: Optional[DeployResult]
    """The live endpoint."""
    endpoint_accuracy: Optional[float]
    """Classifiers: accuracy of the labels the live endpoint returned for CHECK_ROWS val rows of the deployed
    version's data."""
    optimize: Optional[OptimizeResult] = None
    """The compressed variants of `version`, when `optimize.methods` named some."""
    completion_check: Optional[Dict[str, Any]] = None
    """Language models: the endpoint's greedy completion of a fixed prompt against the same generation run
    in this process on the registry's weights."""

    def summary(self) -> Dict[str, Any]:
        """The job's final JSON line."""
        task = get_task(self.version.manifest["config"]["task"]["name"])
        out: Dict[str, Any] = {
            "model": self.version.model,
            "version": self.version.version,
            **version_summary(self.version, task),
            "best_config": self.sweep.best_overrides,
        }
        if self.deployment is None:
            out["endpoint"] = None
        elif self.completion_check is not None:
            out.update(endpoint=self.deployment.endpoint, openai_base_url=f"{self.deployment.base_url}/v1",
                       api_key=self.deployment.api_key, deployed_version=self.deployment.version,
                       endpoint_check=self.completion_check)
        else:
            out.update(endpoint=self.deployment.endpoint, api_key=self.deployment.api_key,
                       deployed_version=self.deployment.version,
                       endpoint_check_accuracy=round(self.endpoint_accuracy or 0.0, 4))
        if self.optimize:
            out["variants"] = self.optimize.summary()["variants"]
        return out


def version_summary(version: ModelVersion, task: Task, *, promotion: bool = True) -> Dict[str, Any]:
    """A registered version's headline metrics (val, and test where evaluated), whether it was promoted
    and why (unless not `promotion`), and, for text, the compression baselines on the same val/test text."""
    metrics = version.metrics
    out: Dict[str, Any] = headline_metrics(task, metrics, ("val", "test"))
    decision = version.manifest.get("promotion")
    if decision is not None and promotion:
        out.update(promoted=decision["promoted"], alias=decision["alias"], promotion_reason=decision["reason"])
    out.update({k: round(float(v), 4) for k, v in metrics.items() if k.endswith("zip_bits_per_byte")
                or k.endswith("xz_bits_per_byte")})
    for key in ("params", "tokens_seen", "tokens_per_s", "mfu"):
        if key in metrics:
            out[key] = round(float(metrics[key]), 4) if key == "mfu" else int(metrics[key])
    return out


@contextlib.contextmanager
def connected(cfg: PipelineConfig, *, keep: bool = False) -> Iterator[None]:
    """Connect to Ray for the duration of a job; shut down an embedded Ray we started unless `keep`.

    S3 writes of this process use `cfg.storage`'s server-side encryption from here on (Ray Train's
    checkpoint filesystem, built here, carries it to the workers)."""
    import ray

    storage.use_s3_server_side_encryption(cfg.storage.s3_sse, cfg.storage.s3_sse_kms_key_id)
    started = ensure_ray(cfg.scaling, verbose=cfg.verbose)
    try:
        yield
    finally:
        if started and not keep:
            ray.shutdown()


def register_run(cfg: PipelineConfig, result: TrainResult, lineage: Dict[str, Any]) -> ModelVersion:
    """Register `result`'s best checkpoint as the next version of `cfg.registry.model_name`.

    `cfg` must be the configuration the run trained with (a sweep's best trial: base + overrides);
    it is recorded in full so the version can be rebuilt and served.
    """
    registry = registry_for(cfg)
    # Tensors as trained (bf16 included); reading refuses a torn checkpoint first.
    weights = load_state(cfg.storage.root, result.checkpoint_path)["model"]
    info = result.data
    if info is None:
        raise ValueError("register_run needs a TrainResult that names its dataset (result.data)")
    task = get_task(cfg.task.name)
    distinct = {w.untyped_storage().data_ptr(): w for w in weights.values()}.values()  # a tied matrix counts once
    metrics = {**result.metrics, "params": sum(w.numel() for w in distinct)}
    files: Dict[str, bytes] = {}
    # The held-out test split, scored once for the checkpoint val chose: what promotion compares.
    metrics.update(evaluate_checkpoint(cfg, info, result.checkpoint_path, "test"))
    if info.kind == "text":
        metrics.update(info.baselines)  # gzip -9 and xz -9e on the same val/test text
        if result.history:
            last = result.history[-1]
            metrics.update({k: last[k] for k in ("tokens_seen", "tokens_per_s", "mfu") if k in last})
    if info.tokenizer:  # text in: the version carries the tokenizer its inputs must be encoded with
        files["tokenizer.json"] = storage.read_bytes(info.tokenizer_url)
    cfg, backbone = _with_backbone(cfg)
    if result.history:  # the epochs the manifest records, drawn: `python -m jobs.registry show` names the file
        files[CURVES_FILE] = training_curves_png(result.history, task.name)
    decision = promotion.decide(registry, cfg.registry, task, metrics=metrics, data_digest=info.digest)
    version = registry.register(
        cfg.registry.model_name,
        weights,
        metrics={**metrics, "history": result.history},
        config=to_dict(cfg),
        lineage={**lineage, **backbone, "checkpoint": result.checkpoint_path, "data_digest": info.digest,
                 "data_url": info.url},
        signature=task.signature(info),
        files=files,
        promotion=decision.record(),
    )
    if decision.alias:
        registry.set_alias(cfg.registry.model_name, decision.alias, version.version)
    log.info("registered %s v%d %s", version.model, version.version, version_summary(version, task, promotion=False))
    log.info("%s", decision.message(version.model, version.version))  # the one line that says why
    # The run's MLflow run (named in its reported epochs) learns which version it became.
    tag_registered_version(cfg.tracking, cfg.storage.root, result.history, f"{version.model}:{version.version}")
    return version


def _with_backbone(cfg: PipelineConfig) -> Tuple[PipelineConfig, Dict[str, Any]]:
    """For a Hugging Face model: `cfg` with the backbone's config.json recorded (model.hf_config), so the
    version rebuilds without the folder, and the lineage naming the folder and its weights' sha256."""
    if cfg.model.name != BuiltinModel.hf:
        return cfg, {}
    from orchestrator.training.hf import hf_config_dict, resolve_model_path, weights_digest

    folder = resolve_model_path(cfg.model.path)
    hf_config = cfg.model.hf_config or hf_config_dict(folder)
    backbone = {"folder": folder, "weights_sha256": weights_digest(folder), "pretrained": not cfg.model.from_scratch}
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_config=hf_config)), {"backbone": backbone}


def register_sweep(cfg: PipelineConfig, sweep: SweepResult) -> ModelVersion:
    """Register the best trial of `sweep`, with its sampled values applied to the recorded config."""
    best_cfg = to_config(cfg, sweep.best_overrides)
    return register_run(best_cfg, sweep.best, {"kind": "sweep", "sweep": sweep.name, "trial_id": sweep.best_trial_id})


def run_pipeline(cfg: PipelineConfig) -> PipelineResult:
    """Data -> sweep -> register -> [optimize] -> deploy, then one real HTTP request to the new endpoint.

    Deploys the new version when it was promoted; otherwise the version `registry.promote_alias` holds
    (so the unversioned route and /versions/<alias> serve the same model).

    Ray must be connected (see `connected`). Raises if the endpoint does not answer correctly.
    """
    info = prepare_dataset(cfg.data, cfg.storage.root)
    sweep = run_sweep(cfg, info)
    version = register_sweep(cfg, sweep)
    if cfg.task.name == "causal_lm":  # served over OpenAI's completions API: checked with a greedy completion
        deployment = run_deploy(cfg, str(serving_version(cfg, version)))
        return PipelineResult(sweep=sweep, version=version, deployment=deployment, endpoint_accuracy=None,
                              completion_check=_completion_check(cfg, deployment))
    # Optional: gated compressed variants of the new version, registered beside it (deploy by alias).
    optimized = run_optimize(cfg, str(version.version)) if cfg.optimize.methods else None
    deployment = run_deploy(cfg, str(serving_version(cfg, version)))
    accuracy = _endpoint_accuracy(cfg, deployment, info)
    return PipelineResult(
        sweep=sweep, version=version, deployment=deployment, endpoint_accuracy=accuracy, optimize=optimized
    )


def serving_version(cfg: PipelineConfig, version: ModelVersion) -> int:
    """What the pipeline deploys after registering `version`: it, when promoted (or when no alias is kept),
    else the version `registry.promote_alias` points at."""
    if not cfg.registry.promote_alias or version.manifest.get("promotion", {}).get("promoted", True):
        return version.version
    return ModelRegistry(cfg.storage.root).aliases(version.model).get(cfg.registry.promote_alias, version.version)


def _endpoint_accuracy(cfg: PipelineConfig, deployment: DeployResult, info: DatasetInfo) -> float:
    """Accuracy of the live endpoint on CHECK_ROWS val rows of the data the deployed version was trained on."""
    deployed = ModelRegistry(cfg.storage.root).get(deployment.model, deployment.version)
    if deployed.manifest.get("lineage", {}).get("data_digest") != info.digest:  # an older version on other data
        info = prepare_dataset(to_config(deployed.manifest["config"]).data, cfg.storage.root)
    if info.kind == "labeled_text":  # a text classifier takes the text itself (BYTES) and tokenizes it
        from orchestrator.training.labeled_text import split_texts

        texts, labels = split_texts(info, "val")
        answer = check_endpoint(deployment, np.array(texts[:CHECK_ROWS], dtype=object), input_name="text")
    else:
        features, labels = load_split(info, "val")
        answer = check_endpoint(deployment, features[:CHECK_ROWS])
    predicted = np.asarray(next(o for o in answer["outputs"] if o["name"] == "label")["data"])
    return float((predicted == labels[:CHECK_ROWS]).mean())


CHECK_PROMPT = "def main():\n    "
CHECK_TOKENS = 16


def _completion_check(cfg: PipelineConfig, deployment: DeployResult) -> Dict[str, Any]:
    """The live endpoint's greedy completion of CHECK_PROMPT (CHECK_TOKENS tokens) and the same greedy
    generation run here on the deployed version's registry weights: they must be the same text. Raises
    RuntimeError when they are not."""
    from orchestrator.client import Client
    from orchestrator.training.text import tokenizer_from_bytes
    from serve.generation import full_recompute_greedy, load_gpt

    registry = ModelRegistry(cfg.storage.root, encryption=cfg.registry.encryption)
    version, arrays = registry.load(deployment.model, deployment.version)
    tokenizer = tokenizer_from_bytes(registry.read_file(deployment.model, deployment.version, "tokenizer.json"))
    prompt_ids = [tokenizer.bos_id, *tokenizer.encode(CHECK_PROMPT)]
    local = full_recompute_greedy(load_gpt(version.manifest, arrays), prompt_ids, CHECK_TOKENS)
    expected = tokenizer.decode(local).decode("utf-8", "replace")
    with Client(deployment.base_url, api_key=deployment.api_key) as client:
        answer = client.complete(f"{deployment.model}:{deployment.version}", CHECK_PROMPT,
                                 max_tokens=CHECK_TOKENS, temperature=0)
        streamed = "".join(client.stream_complete(f"{deployment.model}:{deployment.version}", CHECK_PROMPT,
                                                  max_tokens=CHECK_TOKENS, temperature=0))
    served = answer["choices"][0]["text"]
    if not served == streamed == expected:
        raise RuntimeError(f"the endpoint's greedy completion {served!r} (streamed: {streamed!r}) differs from "
                           f"the in-process one {expected!r}")
    return {"prompt": CHECK_PROMPT, "completion": served, "greedy_matches_in_process": True, "stream_matches": True,
            "completion_tokens": answer["usage"]["completion_tokens"]}


def serve_until_interrupted(cfg: PipelineConfig, *, shutdown_timeout_s: float = 60.0) -> None:
    """Block while Serve answers requests; Ctrl-C or SIGTERM (`ray job stop`) ends it cleanly.

    Both signals only set an event, so they never interrupt a Ray call half-way. Serve's shutdown is
    bounded: if it has not finished in `shutdown_timeout_s`, the job goes on to exit (an embedded Ray
    is stopped with it) instead of hanging.
    """
    import signal
    import threading

    from ray import serve

    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    print(f"serving on http://{cfg.serve.host}:{cfg.serve.port} (Ctrl-C to stop)", flush=True)
    stop.wait()
    stopper = threading.Thread(target=serve.shutdown, daemon=True)
    stopper.start()
    stopper.join(shutdown_timeout_s)
    if stopper.is_alive():
        log.warning("serve.shutdown() did not finish within %.0f s; exiting anyway", shutdown_timeout_s)
