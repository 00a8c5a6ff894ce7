"""Typed configuration: one keyword-only dataclass per concern.

The dataclasses are the schema. They are registered in Hydra's ConfigStore
(`register_configs`) so `conf/` YAML can only select and override; a key that
does not exist or a value of the wrong type fails when Hydra composes, and a
value out of range fails in `__post_init__` when `to_config` builds the typed
object, both before Ray starts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SAMPLERS = ("uniform", "loguniform", "choice", "randint", "grid")
OPTIMIZERS = ("adam", "adamw", "sgd")
BUILTIN_MODELS = ("mlp", "cnn")
PARALLEL_STRATEGIES = ("ddp",)
TUNE_SCHEDULERS = ("asha", "fifo")


def _require(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"{name} {message}")


def _one_of(value: Any, name: str, allowed: tuple) -> None:
    _require(value in allowed, name, f"must be one of {list(allowed)}, got {value!r}")


@dataclass(kw_only=True)
class DataConfig:
    source: str = "digits"
    """'digits' (scikit-learn's bundled handwritten digits), 'synthetic', or a Parquet URL (fsspec)."""
    feature_columns: List[str] = field(default_factory=list)
    """Parquet columns holding features; empty means every column except `label_column`.
    A single list-typed column is also accepted."""
    label_column: str = "label"
    """Parquet column holding the integer class label."""
    input_shape: List[int] = field(default_factory=list)
    """Shape of one sample as the model sees it (e.g. [1, 8, 8]); empty means the source's own:
    [1, 8, 8] for digits, flat features otherwise."""
    val_fraction: float = 0.2
    """Fraction of rows held out for validation (deterministic split)."""
    split_seed: int = 0
    """Seed of the train/val split."""
    synthetic_samples: int = 2000
    """Rows generated when source='synthetic'."""
    synthetic_features: int = 32
    """Features per row when source='synthetic'."""
    synthetic_classes: int = 4
    """Classes when source='synthetic'."""

    def __post_init__(self) -> None:
        _require(bool(self.source), "data.source", "must be 'digits', 'synthetic' or a Parquet URL, got an empty value")
        _require(0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        _require(all(d > 0 for d in self.input_shape), "data.input_shape", f"must be positive, got {self.input_shape}")
        _require(self.synthetic_samples >= 10, "data.synthetic_samples", "must be >= 10")
        _require(self.synthetic_features >= 1, "data.synthetic_features", "must be >= 1")
        _require(self.synthetic_classes >= 2, "data.synthetic_classes", "must be >= 2")


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "mlp"
    """Built-in architecture: 'mlp' or 'cnn'. Ignored when `_target_` is set."""
    _target_: Optional[str] = None
    """Import path of a user model (a torch.nn.Sequential-like class or factory); called with `kwargs`
    plus `in_features`, `input_shape` and `num_classes` where its signature accepts them."""
    hidden: List[int] = field(default_factory=lambda: [128, 64])
    """MLP: width of each hidden stage."""
    channels: List[int] = field(default_factory=lambda: [16, 32])
    """CNN: output channels of each convolutional stage."""
    dropout: float = 0.0
    """Dropout after each stage."""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for a `_target_` model."""

    def __post_init__(self) -> None:
        if self._target_ is None:
            _one_of(self.name, "model.name", BUILTIN_MODELS)
        else:
            _require("." in self._target_, "model._target_", f"must be an import path like 'pkg.module.Class', got {self._target_!r}")
        _require(len(self.hidden) >= 1 and all(h > 0 for h in self.hidden), "model.hidden", f"must be positive widths, got {self.hidden}")
        _require(len(self.channels) >= 1 and all(c > 0 for c in self.channels), "model.channels", f"must be positive, got {self.channels}")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")


@dataclass(kw_only=True)
class ParallelConfig:
    strategy: str = "ddp"
    """How workers split the work: 'ddp' (data parallel, replicated model)."""
    backend: str = "gloo"
    """torch.distributed backend: 'gloo' (CPU) or 'nccl' (GPU)."""

    def __post_init__(self) -> None:
        _one_of(self.strategy, "parallel.strategy", PARALLEL_STRATEGIES)
        _one_of(self.backend, "parallel.backend", ("gloo", "nccl"))


@dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers per training run."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves (fractions let several trials share a small machine)."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    local_num_cpus: int = 10
    """Logical CPUs of the embedded local Ray (ignored when joining a cluster via RAY_ADDRESS)."""
    torch_threads: int = 1
    """Intra-op threads per worker; 1 avoids oversubscribing a small machine."""

    def __post_init__(self) -> None:
        _require(self.num_workers >= 1, "scaling.num_workers", f"must be >= 1, got {self.num_workers}")
        _require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        _require(self.local_num_cpus >= 1, "scaling.local_num_cpus", f"must be >= 1, got {self.local_num_cpus}")
        _require(self.torch_threads >= 1, "scaling.torch_threads", f"must be >= 1, got {self.torch_threads}")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 12
    """Passes over the training split."""
    batch_size: int = 64
    """Global batch size, split evenly across workers."""
    lr: float = 0.003
    """Learning rate."""
    optimizer: str = "adam"
    """'adam', 'adamw' or 'sgd' (momentum 0.9)."""
    weight_decay: float = 0.0
    """L2 penalty."""
    seed: int = 0
    """Seed for weights and shuffling."""
    max_failures: int = 2
    """Times a failed run is restarted from its latest checkpoint."""
    checkpoints_to_keep: int = 2
    """Epoch checkpoints kept per run (best by val accuracy)."""

    def __post_init__(self) -> None:
        _require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        _require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        _require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        _one_of(self.optimizer, "train.optimizer", OPTIMIZERS)
        _require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(self.max_failures >= 0, "train.max_failures", f"must be >= 0, got {self.max_failures}")
        _require(self.checkpoints_to_keep >= 1, "train.checkpoints_to_keep", "must be >= 1")


@dataclass(kw_only=True)
class TuneConfig:
    num_samples: int = 8
    """Trials sampled from the search space (each grid point is repeated this many times)."""
    max_concurrent_trials: int = 4
    """Trials running at once."""
    scheduler: str = "asha"
    """'asha' (stops weak trials early) or 'fifo' (runs every trial to the end)."""
    metric: str = "val_accuracy"
    """Metric that ranks trials."""
    mode: str = "max"
    """'max' or 'min'."""
    grace_period: int = 2
    """ASHA: epochs before a trial may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    trial_cpus: float = 0.01
    """Logical CPUs of each trial's driver (the workers reserve their own)."""
    search_space: Dict[str, Any] = field(
        default_factory=lambda: {
            "train": {"lr": ["loguniform", 0.001, 0.01], "batch_size": ["choice", 32, 64]},
            "model": {"hidden": ["choice", [128, 64], [256, 128]]},
        }
    )
    """Nested like the config; each leaf is [sampler, *args] with sampler one of uniform, loguniform,
    randint (args: low, high) or choice, grid (args: the values). Override a leaf with
    tune.search_space.train.lr=[choice,0.01,0.003]; add one with +tune.search_space.model.dropout=[uniform,0,0.3]."""

    def __post_init__(self) -> None:
        _require(self.num_samples >= 1, "tune.num_samples", f"must be >= 1, got {self.num_samples}")
        _require(self.max_concurrent_trials >= 1, "tune.max_concurrent_trials", "must be >= 1")
        _one_of(self.scheduler, "tune.scheduler", TUNE_SCHEDULERS)
        _one_of(self.mode, "tune.mode", ("max", "min"))
        _require(self.grace_period >= 1, "tune.grace_period", "must be >= 1")
        _require(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        _require(self.trial_cpus > 0, "tune.trial_cpus", "must be > 0 (Ray rejects 0-CPU trials)")
        for path, spec in iter_search_space(self.search_space):
            name = f"tune.search_space.{path}"
            _require(_is_sampler(spec), name, f"must be [sampler, *args] with sampler in {list(SAMPLERS)}, got {spec!r}")
            sampler, args = spec[0], list(spec[1:])
            if sampler in ("uniform", "loguniform", "randint"):
                # Check the types first: comparing a string bound would raise a TypeError naming no field.
                numeric = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                _require(numeric and args[0] < args[1], name, f"needs numbers [low, high] with low < high, got {args!r}")
                _require(sampler != "loguniform" or args[0] > 0, name, f"loguniform needs low > 0, got {args!r}")
            else:
                _require(isinstance(args, list) and len(args) >= 1, name, f"needs a non-empty list, got {args!r}")


@dataclass(kw_only=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (keep loopback unless the network is trusted)."""
    port: int = 8000
    """HTTP port of the Serve proxy."""
    app_name: str = "orchestrator"
    """Ray Serve application name."""
    model_version: str = "production"
    """Registry version number or alias to deploy (jobs.deploy)."""
    min_replicas: int = 1
    """Autoscaling lower bound."""
    max_replicas: int = 2
    """Autoscaling upper bound."""
    target_ongoing_requests: float = 4.0
    """Autoscaling target of in-flight requests per replica."""
    replica_cpus: float = 0.25
    """Logical CPUs each model replica reserves."""
    max_batch_size: int = 32
    """Requests merged into one forward pass by dynamic batching."""
    batch_wait_timeout_s: float = 0.005
    """How long a batch waits to fill."""
    max_rows_per_request: int = 1024
    """Rows one infer request may carry (more is answered 413)."""
    block: bool = True
    """Keep serving after the pipeline finishes (False: exit right after the endpoint check)."""

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, "serve.port", f"must be a TCP port, got {self.port}")
        _require(bool(self.model_version), "serve.model_version", "must not be empty")
        _require(self.min_replicas >= 1, "serve.min_replicas", f"must be >= 1, got {self.min_replicas}")
        _require(self.max_replicas >= self.min_replicas, "serve.max_replicas", f"must be >= serve.min_replicas ({self.min_replicas}), got {self.max_replicas}")
        _require(self.target_ongoing_requests > 0, "serve.target_ongoing_requests", "must be > 0")
        _require(self.replica_cpus > 0, "serve.replica_cpus", "must be > 0")
        _require(self.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1")
        _require(self.batch_wait_timeout_s >= 0, "serve.batch_wait_timeout_s", "must be >= 0")
        _require(self.max_rows_per_request >= 1, "serve.max_rows_per_request", "must be >= 1")


@dataclass(kw_only=True)
class StorageConfig:
    root: str = "file://./runs"
    """fsspec URL holding datasets, Train/Tune results, the registry and reports
    (file://, s3://, gs://, memory:// for driver-only tests)."""

    def __post_init__(self) -> None:
        _require(bool(self.root), "storage.root", "must not be empty")
        if self.root.startswith("file://") or "://" not in self.root:
            # Resolve relative paths once, at the driver, so every worker sees the same place.
            path = self.root.removeprefix("file://")
            self.root = "file://" + os.path.abspath(os.path.expanduser(path))


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Log each trial (rank 0 only) to Weights & Biases."""
    project: str = "orchestrator"
    """wandb project."""
    mode: str = "offline"
    """wandb mode: 'offline' (sync later with `wandb sync`), 'online' or 'disabled'."""
    dir: Optional[str] = None
    """Local directory for wandb files; default <storage root>/wandb for a local root, else ./wandb."""

    def __post_init__(self) -> None:
        _one_of(self.mode, "tracking.mode", ("offline", "online", "disabled"))


@dataclass(kw_only=True)
class RegistryConfig:
    model_name: str = "digits"
    """Registry model that training and sweeps add versions to."""
    promote_alias: str = "production"
    """Alias pointed at each new version; empty leaves aliases alone."""

    def __post_init__(self) -> None:
        _require(_is_identifier(self.model_name), "registry.model_name", f"must be letters, digits, '-', '_' or '.', got {self.model_name!r}")
        _require(self.promote_alias == "" or _is_identifier(self.promote_alias), "registry.promote_alias", f"invalid alias {self.promote_alias!r}")
        _require(not self.promote_alias.isdigit(), "registry.promote_alias", "must not be a number (numbers are versions)")


@dataclass(kw_only=True)
class PipelineConfig:
    data: DataConfig = field(default_factory=DataConfig)
    """Where samples come from and how they are split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture, as ordered stages plus a head."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel plan of a training run."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation of one run."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """The hyperparameter sweep."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """The HTTP endpoint."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Where state lives."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """Versioned models."""
    run_name: str = "default"
    """Names this run's Train/Tune results under the storage root (set by experiment files too)."""

    def __post_init__(self) -> None:
        _require(_is_identifier(self.run_name), "run_name", f"must be letters, digits, '-', '_' or '.', got {self.run_name!r}")
        for path, _ in iter_search_space(self.tune.search_space):
            _require(_has_field(self, path), f"tune.search_space.{path}", "names no config field")


def _is_identifier(name: str) -> bool:
    # Names become path components under the storage root: '.' and '..' would step outside their folder.
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "-_." for c in name)


def _is_sampler(spec: Any) -> bool:
    return isinstance(spec, (list, tuple)) and len(spec) >= 1 and spec[0] in SAMPLERS


def iter_search_space(space: Dict[str, Any], prefix: str = ""):
    """Yield (dotted path, sampler spec) for every leaf of a nested search space."""
    for key, value in space.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from iter_search_space(value, path + ".")
        else:
            yield path, value


def _has_field(obj: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def with_overrides(cfg: PipelineConfig, overrides: Dict[str, Any]) -> PipelineConfig:
    """Return a copy of `cfg` with dotted-path values replaced (e.g. {'train.lr': 0.01}), re-validated."""
    nested: Dict[str, Any] = {}
    for dotted, value in overrides.items():
        head, _, rest = dotted.partition(".")
        nested.setdefault(head, {})
        if rest:
            nested[head][rest] = value
        else:
            nested[head] = value
    changes = {}
    for name, value in nested.items():
        current = getattr(cfg, name)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[name] = with_overrides(current, value)
        else:
            changes[name] = value
    return dataclasses.replace(cfg, **changes)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain, JSON-friendly dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def from_dict(data: Dict[str, Any]) -> PipelineConfig:
    """Rebuild a PipelineConfig from `to_dict` output (e.g. a registry manifest)."""
    kinds = {f.name: f.type for f in dataclasses.fields(PipelineConfig)}
    parts = {}
    for name, value in data.items():
        cls = globals().get(kinds.get(name, ""), None)
        parts[name] = cls(**value) if isinstance(value, dict) and cls else value
    return PipelineConfig(**parts)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (`conf/config.yaml` extends `pipeline_schema`)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="pipeline_schema", node=PipelineConfig)


def to_config(cfg: Any) -> PipelineConfig:
    """Turn a composed Hydra DictConfig into a validated PipelineConfig (raises ValueError naming the field)."""
    from omegaconf import OmegaConf

    if isinstance(cfg, PipelineConfig):
        return cfg
    obj = OmegaConf.to_object(cfg)
    if isinstance(obj, dict):  # composed without the schema: validate by building the dataclasses
        obj = from_dict(obj)
    return obj
