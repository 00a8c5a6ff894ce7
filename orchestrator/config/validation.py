"""Checks that relate two sections of a config, in one place.

A field's own range check sits in its dataclass (`orchestrator.config.schema`); what only makes sense
across sections (a pipeline plan against the batch and the workers, a schedule against the model's
stages and the epoch budget, search-space paths against the schema) is checked here. `to_config` runs
`validate` on every config it builds; the training loop calls `check_schedule` again for user models,
whose stages are known only once they are built.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Sequence

from orchestrator.config.schema import (
    HEAD,
    TASK_METRICS,
    BuiltinModel,
    DataKind,
    ModelConfig,
    ParallelStrategy,
    PhaseConfig,
    PipelineConfig,
    PipelineSchedule,
    ScheduleConfig,
    ScheduleKind,
    TaskKind,
    TrackingBackend,
    iter_search_space,
    require,
)


def validate(cfg: PipelineConfig) -> None:
    """Raise ValueError naming the field where two sections of `cfg` do not fit together."""
    check_task(cfg)
    check_parallel_plan(cfg)
    stages = builtin_stage_names(cfg.model)
    if stages:  # a user model's stages are checked when it is built
        check_schedule(cfg.schedule, stages, epochs=cfg.train.epochs)
    check_search_space(cfg)
    check_version_refs(cfg)
    check_tracking(cfg)


def check_task(cfg: PipelineConfig) -> None:
    """The task against the data, the model and the metric trials are ranked by."""
    task, text = str(cfg.task.name), cfg.data.kind == DataKind.text
    if task == TaskKind.causal_lm:
        require(text, "data.kind", "must be 'text' for task.name=causal_lm (use data=text)")
        require(cfg.model.name == BuiltinModel.gpt or bool(cfg.model._target_), "model.name",
                f"must be 'gpt' (or a _target_ model) for task.name=causal_lm, got {cfg.model.name}")
    else:
        require(not text, "data.kind",
                f"must be 'tabular' or 'labeled_text' for task.name={task} (text needs task=causal_lm)")
        require(cfg.model.name != BuiltinModel.gpt or bool(cfg.model._target_), "model.name",
                f"gpt is a language model: it needs task=causal_lm, not task.name={task}")
    if cfg.model.name == BuiltinModel.hf and not cfg.model._target_:
        require(cfg.data.kind == DataKind.labeled_text, "data.kind",
                f"must be 'labeled_text' for model.name=hf (token ids of labelled text), got {cfg.data.kind}")
        positions = int(hf_architecture(cfg.model).get("max_position_embeddings", cfg.data.context))
        require(cfg.data.context <= positions, "data.context",
                f"must be <= the backbone's max_position_embeddings ({positions}), got {cfg.data.context}")
    if cfg.model.name == BuiltinModel.gpt and not cfg.model._target_:
        require(cfg.data.context <= cfg.model.context, "data.context",
                f"must be <= model.context ({cfg.model.context}), got {cfg.data.context}")
        require(not (cfg.parallel.strategy == ParallelStrategy.pipeline and cfg.model.tie_embeddings),
                "model.tie_embeddings", "must be false under parallel.strategy=pipeline (the embedding and the head "
                "sit on different ranks, which cannot share one weight)")
    require(not cfg.optimize.methods or task == TaskKind.classification, "optimize.methods",
            f"compress classification models only (their gate compares accuracy), not task.name={task}")
    metrics = ["train_loss", *(f"val_{name}" for name in TASK_METRICS[task])]
    require(cfg.tune.metric in metrics, "tune.metric", f"must be one of {metrics} for task.name={task}, "
            f"got {cfg.tune.metric!r}")


def check_tracking(cfg: PipelineConfig) -> None:
    """MLflow's default store (a sqlite file under the storage root) needs a local root."""
    tracking = cfg.tracking
    if tracking.enabled and tracking.backend == TrackingBackend.mlflow and not tracking.uri:
        # sqlite cannot live on S3, and a file on a worker's own disk is out of the driver's reach.
        require(cfg.storage.root.startswith("file://"), "tracking.uri",
                f"must be set for tracking.backend=mlflow with storage.root={cfg.storage.root!r}: the default "
                "store is a sqlite file under a local root (give a server http(s)://... or sqlite:////shared/path.db)")


def check_parallel_plan(cfg: PipelineConfig) -> None:
    """The pipeline plan's micro-batches against train.batch_size and scaling.num_workers."""
    parallel = cfg.parallel
    if parallel.strategy != ParallelStrategy.pipeline:
        return
    require(cfg.train.batch_size % parallel.microbatches == 0, "parallel.microbatches",
            f"must divide train.batch_size ({cfg.train.batch_size}), got {parallel.microbatches}")
    if parallel.pipeline_schedule == PipelineSchedule("1f1b"):  # torch's 1F1B needs a micro-batch per stage in flight
        require(parallel.microbatches >= cfg.scaling.num_workers, "parallel.microbatches",
                f"must be >= scaling.num_workers ({cfg.scaling.num_workers}) for 1f1b, got {parallel.microbatches}")


def check_version_refs(cfg: PipelineConfig) -> None:
    """Versions the jobs name (serve.model_version, optimize.source) as references that parse and, when they
    name a model, name registry.model_name: the model every job of this config works on."""
    from orchestrator.registry.refs import parse_ref  # here: the registry package imports this one

    for name, ref in (("serve.model_version", cfg.serve.model_version), ("optimize.source", cfg.optimize.source)):
        try:
            model = parse_ref(ref).model
        except ValueError as err:
            raise ValueError(f"{name} {err}") from None
        require(model in (None, cfg.registry.model_name), name,
                f"names model {model!r}, but registry.model_name is {cfg.registry.model_name!r} "
                f"(set registry.model_name={model} or name a version of {cfg.registry.model_name!r})")


def check_search_space(cfg: PipelineConfig) -> None:
    """Every tune.search_space leaf must name a field of the config."""
    for path, _ in iter_search_space(cfg.tune.search_space):
        require(_has_field(cfg, path), f"tune.search_space.{path}", "names no config field")


def _has_field(obj: Any, dotted: str) -> bool:
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            return False
        obj = getattr(obj, part)
    return True


def builtin_stage_names(model: ModelConfig) -> List[str]:
    """Stage names of a built-in model (as orchestrator.training.models builds them), or [] for a `_target_` model."""
    if model._target_:
        return []
    if model.name == "cnn":
        return [f"conv{i}" for i in range(len(model.channels))] + ["dense"]
    if model.name == "gpt":
        return ["embed"] + [f"block{i}" for i in range(model.layers)]
    if model.name == "hf":
        return ["embed"] + [f"layer{i}" for i in range(int(hf_architecture(model)["num_hidden_layers"]))]
    return [f"block{i}" for i in range(len(model.hidden))]


def hf_architecture(model: ModelConfig) -> Dict[str, Any]:
    """The transformers config of a model.name=hf model: model.hf_config, else the folder's config.json (read
    here, before Ray starts, so a wrong model.path fails first)."""
    from orchestrator.training.hf import hf_config_dict  # reads JSON only: transformers is not imported

    return dict(model.hf_config) or hf_config_dict(model.path)


def phase_count(schedule: ScheduleConfig, stages: Sequence[str]) -> int:
    """Phases `schedule` has on a model with `stages`."""
    if schedule.kind == ScheduleKind.custom:
        return len(schedule.phases)
    if schedule.kind == ScheduleKind.layerwise:
        return len(stages) + int(schedule.finetune)
    if schedule.kind == ScheduleKind.gradual_unfreeze:
        return unfrozen_stages(schedule, stages) + 1  # the head alone, then one more stage unfrozen per phase
    return 1


def unfrozen_stages(schedule: ScheduleConfig, stages: Sequence[str]) -> int:
    """How many stages gradual unfreezing ends with unfrozen (schedule.unfreeze_depth, at most every stage)."""
    return min(schedule.unfreeze_depth or len(stages), len(stages))


def check_schedule(schedule: ScheduleConfig, stages: Sequence[str], *, epochs: int) -> None:
    """Raise ValueError naming the field if `schedule` cannot run on a model with `stages` in `epochs`
    (train.epochs) epochs."""
    stages = list(stages)
    if schedule.kind == ScheduleKind.custom:
        for index, phase in enumerate(schedule.phases):
            check_custom_phase(index, phase, stages)
        return
    count = phase_count(schedule, stages)
    if schedule.phase_epochs:
        given = len(schedule.phase_epochs)
        require(given == count, "schedule.phase_epochs",
                f"has {given} entries, but schedule.kind={schedule.kind} has {count} phases on this model")
    else:
        require(epochs >= count, "train.epochs",
                f"must be >= {count} (one per phase of schedule.kind={schedule.kind}), got {epochs}")


def check_custom_phase(index: int, phase: PhaseConfig, stages: List[str]) -> None:
    """A custom phase's output and trainable names must be stages of the model (or HEAD), at or below its output."""
    name = f"schedule.phases[{index}]"
    require(phase.output == HEAD or phase.output in stages, f"{name}.output",
            f"must be 'head' or one of the stages {stages}, got {phase.output!r}")
    path = stages if phase.output == HEAD else stages[: stages.index(phase.output) + 1]
    named = [*stages, HEAD] if phase.trainable == ["*"] else list(phase.trainable)
    unknown = [n for n in named if n not in {*stages, HEAD}]
    require(not unknown, f"{name}.trainable",
            f"names {unknown}, which are not stages of this model {stages} or 'head'")
    outside = [n for n in named if n != HEAD and n not in path]
    require(not outside, f"{name}.trainable", f"has {outside} above its output stage {phase.output!r}")
