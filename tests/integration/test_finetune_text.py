"""Fine-tuning the pretrained all-MiniLM-L6-v2 stage by stage on the SpamAssassin emails, on a real local Ray:
a cached frozen prefix gives the loss curve recomputing it gives, frozen layers come out of their phases
bit-identical to the pretrained weights, FSDP2 (per layer) runs the same schedules, and the fine-tuned model
registers as a version with its tokenizer, a text signature and the backbone's digest in its lineage."""

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from ray import serve
from safetensors.torch import load_file

from orchestrator.client import check_endpoint
from orchestrator.config import (
    BuiltinModel,
    DataConfig,
    DataKind,
    ModelConfig,
    Optimizer,
    ParallelConfig,
    ParallelStrategy,
    PipelineConfig,
    RegistryConfig,
    ScheduleConfig,
    ScheduleKind,
    ServeConfig,
    StorageConfig,
    TrackingConfig,
    TrainConfig,
)
from orchestrator.flows import register_run
from orchestrator.registry import ModelRegistry
from orchestrator.training.hf import resolve_model_path, tokenizer_json
from orchestrator.training.labeled_text import encode_texts, split_texts
from orchestrator.training.loop import load_state, run_train
from orchestrator.training.models import build_model
from serve.deploy import run_deploy
from tests.support import free_port

pytestmark = pytest.mark.slow

DEPTH = 2
"""Layers gradual unfreezing ends with unfrozen: layer4 and layer5 train, embed and layer0-3 never do."""


def _cfg(root: Path, *, strategy: str = "ddp", schedule: str = "gradual_unfreeze", cache: bool = True,
         epochs: int = 6) -> PipelineConfig:
    return PipelineConfig(
        storage=StorageConfig(root=f"file://{root}"), tracking=TrackingConfig(enabled=False),
        data=DataConfig(kind=DataKind.labeled_text, source="spam_assassin", context=32, max_train_rows=64,
                        max_val_rows=32, val_fraction=0.1, test_fraction=0.1),
        model=ModelConfig(name=BuiltinModel.hf, dropout=0.1),
        schedule=ScheduleConfig(kind=ScheduleKind(schedule), unfreeze_depth=DEPTH, lr_decay=0.8, head_lr_scale=20.0,
                                cache_frozen=cache),
        train=TrainConfig(epochs=epochs, batch_size=16, lr=5e-5, optimizer=Optimizer.adamw, checkpoints_to_keep=1),
        parallel=ParallelConfig(strategy=ParallelStrategy(strategy)),
        registry=RegistryConfig(model_name="spam"),
    )


@pytest.fixture(scope="module")
def cached_run(ray_cluster, tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("cached"))
    return cfg, run_train(cfg)


def _pretrained() -> dict:
    return load_file(str(Path(resolve_model_path("")) / "model.safetensors"))


def test_caching_the_frozen_prefix_gives_the_same_loss_curve(cached_run, tmp_path):
    _, cached = cached_run
    recomputed = run_train(_cfg(tmp_path, cache=False))
    assert [h["phase_name"] for h in cached.run_history] == ["unfreeze:0"] * 2 + ["unfreeze:1"] * 2 + ["unfreeze:2"] * 2
    for a, b in zip(cached.run_history, recomputed.run_history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    # The cache holds each row's top frozen output with its mask: 32 x (384 + 1) fp32 per row.
    rows_per_worker = 64 // 2
    assert cached.run_history[0]["prefix_cache_mb"] == pytest.approx(rows_per_worker * 32 * 385 * 4 / 2**20)
    assert recomputed.run_history[0]["prefix_cache_mb"] == 0.0
    # Two epochs per phase: the prefix runs once per phase instead of once per epoch.
    assert cached.run_history[-1]["train_gflops"] < recomputed.run_history[-1]["train_gflops"]


def test_a_cache_over_its_budget_is_recomputed_instead(ray_cluster, tmp_path):
    cfg = _cfg(tmp_path, epochs=1, schedule="linear_probe")
    cfg = dataclasses.replace(cfg, schedule=dataclasses.replace(cfg.schedule, cache_max_mb=0.5))
    (epoch,) = run_train(cfg).run_history
    assert epoch["prefix_cache_mb"] == 0.0  # 32 rows x 48 KB = 1.5 MB > 0.5 MB


def test_frozen_layers_are_bit_identical_after_their_phases(cached_run):
    cfg, result = cached_run
    trained = load_state(cfg.storage.root, result.checkpoint_path)["model"]
    pretrained = _pretrained()
    frozen = [f"layer{i}" for i in range(6 - DEPTH)]
    unfrozen = [f"layer{i}" for i in range(6 - DEPTH, 6)]
    for stage in frozen:
        names = [n for n in trained if n.startswith(f"stages.{stage}.")]
        assert names
        for name in names:
            hf_name = name.replace(f"stages.{stage}.layer.", f"encoder.layer.{stage[5:]}.")
            assert torch.equal(trained[name], pretrained[hf_name]), name
    for stage in unfrozen:
        query = trained[f"stages.{stage}.layer.attention.self.query.weight"]
        assert not torch.equal(query, pretrained[f"encoder.layer.{stage[5:]}.attention.self.query.weight"])
    embeddings = trained["stages.embed.embeddings.word_embeddings.weight"]
    assert torch.equal(embeddings, pretrained["embeddings.word_embeddings.weight"])


@pytest.mark.parametrize("schedule", ["gradual_unfreeze", "end_to_end"])
def test_fsdp2_runs_the_schedules_per_layer(ray_cluster, tmp_path, schedule):
    result = run_train(_cfg(tmp_path, strategy="fsdp", schedule=schedule, epochs=3))
    losses = [h["train_loss"] for h in result.run_history]
    assert losses[-1] < losses[0]
    assert result.metrics["val_accuracy"] > 0.6


def test_the_fine_tuned_model_registers_with_its_tokenizer_and_backbone(cached_run):
    cfg, result = cached_run
    version = register_run(cfg, result, {"kind": "train"})
    folder = Path(resolve_model_path(""))
    backbone = version.manifest["lineage"]["backbone"]
    assert backbone["folder"] == str(folder) and backbone["pretrained"] is True
    assert backbone["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    registry = ModelRegistry(cfg.storage.root)
    assert registry.read_file("spam", version.version, "tokenizer.json") == (folder / "tokenizer.json").read_bytes()
    signature = version.manifest["signature"]
    assert signature["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
    assert signature["class_names"] == ["ham", "spam"] and signature["context"] == 32
    # The recorded config rebuilds the architecture without the folder.
    assert version.manifest["config"]["model"]["hf_config"]["num_hidden_layers"] == 6
    assert version.metrics["test_accuracy"] > 0.6


def test_the_text_classifier_answers_bytes_over_the_v2_protocol(cached_run):
    """The registered version (the previous test) served: one string per row, tokenized in the replica with the
    version's tokenizer, gives the labels and probabilities the trained model gives in-process."""
    cfg, result = cached_run
    cfg = dataclasses.replace(cfg, serve=ServeConfig(port=free_port(), min_replicas=1, max_replicas=1))
    info = result.data
    texts, _ = split_texts(info, "val")
    texts = texts[:8]
    model = build_model(cfg.model, info.input_shape, info.num_classes)
    model.load_state_dict(load_state(cfg.storage.root, result.checkpoint_path)["model"])
    ids, _ = encode_texts(tokenizer_json(""), texts, info.context)
    with torch.no_grad():
        local = torch.softmax(model.eval()(torch.from_numpy(ids.astype(np.int64))), dim=1).numpy()
    deployed = run_deploy(cfg, "latest")
    try:
        answer = check_endpoint(deployed, np.array(texts, dtype=object), input_name="text")
        outputs = {o["name"]: np.asarray(o["data"]) for o in answer["outputs"]}
        assert outputs["label"].tolist() == local.argmax(axis=1).tolist()
        np.testing.assert_allclose(outputs["probabilities"].reshape(local.shape), local, atol=1e-4)
        # A string that is no text row of the signature (a number) is the client's mistake: 400, not 500.
        bad = requests.post(f"{deployed.endpoint}/infer", headers={"Authorization": f"Bearer {deployed.api_key}"},
                            json={"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]})
        assert bad.status_code == 400, bad.text
    finally:
        serve.shutdown()
