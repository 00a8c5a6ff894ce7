"""Typed configuration of every job: the schema, the one way to build it, and the checks.

    from orchestrator.config import PipelineConfig, to_config
    cfg = to_config(dcfg)                       # a composed Hydra DictConfig (jobs/)
    cfg = to_config(manifest["config"])         # a stored plain dict
    cfg = to_config(cfg, {"train.lr": 0.01})    # dotted overrides on a config

Importing this package loads neither torch nor Ray (tests/unit/test_config.py checks it).
"""

from orchestrator.config.build import flatten, register_configs, to_config, to_dict
from orchestrator.config.schema import (
    EXPORT_KINDS,
    HEAD,
    OPTIMIZE_METHODS,
    AuthConfig,
    BuiltinModel,
    Choice,
    CompareConfig,
    DataConfig,
    DataKind,
    DistBackend,
    DistillConfig,
    EncryptionConfig,
    ExportConfig,
    ExportJob,
    ExportKind,
    GenerationConfig,
    LimitsConfig,
    LRSchedule,
    MetricMode,
    ModelConfig,
    OptimizeConfig,
    OptimizeMethod,
    Optimizer,
    ParallelConfig,
    ParallelStrategy,
    PhaseConfig,
    PipelineConfig,
    PipelineSchedule,
    Precision,
    PromoteMode,
    PruneConfig,
    QuantBackend,
    QuantizeConfig,
    RegistryConfig,
    RolloutConfig,
    ScalingConfig,
    ScheduleConfig,
    ScheduleKind,
    ServeConfig,
    StorageConfig,
    TaskConfig,
    TaskKind,
    TokenizerKind,
    TrackingBackend,
    TrackingConfig,
    TrackingMode,
    TrainConfig,
    TuneConfig,
    TuneScheduler,
    is_identifier,
    iter_search_space,
    require,
)
from orchestrator.config.validation import builtin_stage_names, check_schedule, phase_count, unfrozen_stages, validate

__all__ = [
    "flatten",
    "EXPORT_KINDS", "HEAD", "OPTIMIZE_METHODS",
    "AuthConfig", "CompareConfig", "DataConfig", "DistillConfig", "EncryptionConfig", "ExportConfig",
    "GenerationConfig", "LimitsConfig",
    "ModelConfig",
    "OptimizeConfig", "ParallelConfig", "PhaseConfig", "PipelineConfig", "PruneConfig", "QuantizeConfig",
    "RegistryConfig", "RolloutConfig", "ScalingConfig", "ScheduleConfig", "ServeConfig", "StorageConfig",
    "TaskConfig", "TrackingConfig", "TrainConfig", "TuneConfig",
    "BuiltinModel", "Choice", "DataKind", "DistBackend", "LRSchedule", "Precision", "TaskKind", "TokenizerKind",
    "ExportJob", "ExportKind", "MetricMode", "OptimizeMethod", "Optimizer",
    "ParallelStrategy", "PipelineSchedule", "PromoteMode", "QuantBackend", "ScheduleKind", "TrackingBackend",
    "TrackingMode", "TuneScheduler",
    "builtin_stage_names", "check_schedule", "is_identifier", "iter_search_space", "phase_count", "register_configs",
    "unfrozen_stages",
    "require", "to_config", "to_dict", "validate",
]
