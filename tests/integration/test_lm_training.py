"""Language models on a real local Ray: a tiny GPT on real text (this machine's standard library source),
tokenized and streamed by Ray Data, under every parallel plan; resumed runs; the registry round trip."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict

import pytest

from orchestrator.config import (
    BuiltinModel,
    DataConfig,
    DataKind,
    MetricMode,
    ModelConfig,
    Optimizer,
    ParallelConfig,
    ParallelStrategy,
    PipelineConfig,
    Precision,
    RegistryConfig,
    StorageConfig,
    TaskConfig,
    TaskKind,
    TrackingConfig,
    TrainConfig,
    TuneConfig,
)
from orchestrator.flows import register_run
from orchestrator.registry import ModelRegistry
from orchestrator.training.loop import checkpoint_weights, run_train

VOCAB = 512
SIZES: Dict[str, Any] = {"layers": 2, "heads": 2, "width": 32, "context": 32}


def _cfg(root: str, *, strategy: ParallelStrategy = ParallelStrategy.ddp, **train) -> PipelineConfig:
    return PipelineConfig(
        task=TaskConfig(name=TaskKind.causal_lm),
        data=DataConfig(kind=DataKind.text, source="stdlib", max_files=24, vocab_size=VOCAB, context=32,
                        val_fraction=0.15, test_fraction=0.15),
        model=ModelConfig(name=BuiltinModel.gpt, tie_embeddings=strategy != ParallelStrategy.pipeline, **SIZES),
        parallel=ParallelConfig(strategy=strategy, microbatches=2),
        train=TrainConfig(**{"epochs": 3, "steps_per_epoch": 12, "batch_size": 16, "lr": 0.01,
                             "optimizer": Optimizer.adamw, "val_batches": 6, **train}),
        tune=TuneConfig(metric="val_loss", mode=MetricMode.min),
        storage=StorageConfig(root=root),
        tracking=TrackingConfig(enabled=False),
        registry=RegistryConfig(model_name="tiny_lm"),
    )


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory) -> str:
    return f"file://{tmp_path_factory.mktemp('lm')}"


def _learned(history) -> None:
    first, last = history[0], history[-1]
    # Below a uniform guess over the vocabulary (what the initial weights predict), and still falling.
    assert last["val_loss"] < math.log(VOCAB) - 0.5, [h["val_loss"] for h in history]
    assert last["val_loss"] < first["val_loss"], [h["val_loss"] for h in history]
    assert last["val_bits_per_byte"] < first["val_bits_per_byte"]
    assert last["tokens_per_s"] > 0 and last["tokens_seen"] > first["tokens_seen"]


def test_ddp_trains_a_tiny_gpt_registers_it_with_test_bits_per_byte_and_its_tokenizer(ray_cluster, lm_root):
    cfg = _cfg(lm_root)
    result = run_train(cfg)
    _learned(result.run_history)
    info = result.data
    assert info.kind == "text" and info.num_classes >= VOCAB - 2
    version = register_run(cfg, result, {"kind": "train"})
    metrics = version.metrics
    assert metrics["test_bits_per_byte"] > 0 and metrics["test_tokens"] > 0
    assert metrics["test_gzip_bits_per_byte"] == info.baselines["test_gzip_bits_per_byte"]
    assert version.signature["task"] == "causal_lm" and version.signature["context"] == 32
    registry = ModelRegistry(cfg.storage.root)
    stored = registry.read_file("tiny_lm", version.version, "tokenizer.json")
    with open(info.tokenizer_url.removeprefix("file://"), "rb") as f:
        assert stored == f.read()
    json.loads(stored)  # the tokenizer file as trained, not a pickle


@pytest.mark.parametrize("strategy", [ParallelStrategy.fsdp, ParallelStrategy.pipeline])
def test_model_parallel_plans_train_a_tiny_gpt(ray_cluster, lm_root, strategy):
    result = run_train(dataclasses.replace(_cfg(lm_root, strategy=strategy), run_name=f"lm-{strategy}"))
    _learned(result.run_history)


def test_bf16_training_learns(ray_cluster, lm_root):
    cfg = _cfg(lm_root, precision=Precision.bf16, grad_accum_steps=2, grad_clip=1.0, lr_schedule="cosine",
               warmup_steps=4)
    result = run_train(dataclasses.replace(cfg, run_name="lm-bf16"))
    _learned(result.run_history)


def test_a_resumed_lm_run_matches_an_uninterrupted_one(ray_cluster, lm_root, tmp_path):
    def crashing(marker) -> PipelineConfig:
        base = _cfg(lm_root, epochs=4, steps_per_epoch=8, max_failures=1)
        model = ModelConfig(_target_="tests.integration.crashing_model.crash_once_gpt",
                            kwargs={"marker": str(marker), "crash_after_calls": 30, **SIZES})
        return dataclasses.replace(base, model=model, run_name=f"lm-{marker.name}")

    marker = tmp_path / "crashed"
    resumed = run_train(crashing(marker))
    assert marker.exists(), "the injected failure never happened"
    clean_marker = tmp_path / "clean"
    clean_marker.touch()  # already "crashed": this run never fails
    clean = run_train(crashing(clean_marker))
    history = resumed.run_history
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    assert max(h["restored_epoch"] for h in history) >= 1, "the run did not resume from a checkpoint"
    assert history[-1]["steps"] == clean.run_history[-1]["steps"] == 32
    for ours, theirs in zip(history, clean.run_history):  # the same batches in the same order, epoch by epoch
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-5)
    root = lm_root
    ours_w = checkpoint_weights(root, resumed.checkpoint_path)
    theirs_w = checkpoint_weights(root, clean.checkpoint_path)
    for name in theirs_w:
        assert abs(ours_w[name] - theirs_w[name]).max() < 1e-5, name

