"""Schedules as data: phase expansion, validation before Ray starts, caching and compute accounting."""

import dataclasses

import pytest
import torch

from orchestrator.config import (
    BuiltinModel,
    ModelConfig,
    ParallelConfig,
    ParallelStrategy,
    PhaseConfig,
    PipelineConfig,
    ScheduleConfig,
    ScheduleKind,
    TrainConfig,
    builtin_stage_names,
    to_config,
)
from orchestrator.training.models import build_model
from orchestrator.training.phases import (
    Compute,
    PhaseModel,
    add_cache_compute,
    add_epoch_compute,
    forward_flops,
    make_aux_heads,
)
from orchestrator.training.schedules import AUX, HEAD, expand_schedule, schedule_epochs

STAGES = ["block0", "block1", "block2"]


def _phases(kind, epochs=12, lr=0.01, **schedule):
    return expand_schedule(ScheduleConfig(kind=kind, **schedule), STAGES, epochs=epochs, lr=lr)


def test_end_to_end_is_one_phase_training_everything():
    (phase,) = _phases("end_to_end")
    assert phase.trainable == (*STAGES, HEAD) and phase.epochs == 12 and phase.frozen_prefix == ()


def test_layerwise_trains_each_stage_on_a_frozen_prefix_then_finetunes():
    phases = _phases("layerwise")
    assert [p.name for p in phases] == ["stage:block0", "stage:block1", "stage:block2", "finetune"]
    assert [p.trainable for p in phases[:3]] == [("block0", AUX), ("block1", AUX), ("block2", HEAD)]
    assert [p.frozen_prefix for p in phases[:3]] == [(), ("block0",), ("block0", "block1")]
    assert [p.output for p in phases] == ["block0", "block1", HEAD, HEAD]
    assert phases[1].path == ("block0", "block1")  # stages above the phase's output do not run
    assert [p.epochs for p in phases] == [3, 3, 3, 3] and [p.first_epoch for p in phases] == [0, 3, 6, 9]
    assert phases[3].lr == pytest.approx({"block0": 0.01, "block1": 0.01, "block2": 0.01, HEAD: 0.01})


def test_gradual_unfreeze_unfreezes_top_down_with_decayed_rates():
    phases = _phases("gradual_unfreeze", epochs=8, lr_decay=0.5)
    assert [p.trainable for p in phases] == [(HEAD,), ("block2", HEAD), ("block1", "block2", HEAD), (*STAGES, HEAD)]
    assert phases[0].frozen_prefix == tuple(STAGES)
    assert phases[3].lr == pytest.approx({HEAD: 0.01, "block2": 0.005, "block1": 0.0025, "block0": 0.00125})


def test_gradual_unfreeze_can_stop_at_a_depth_and_heads_train_faster():
    phases = _phases("gradual_unfreeze", epochs=6, unfreeze_depth=2, lr_decay=0.5, head_lr_scale=10)
    assert [p.trainable for p in phases] == [(HEAD,), ("block2", HEAD), ("block1", "block2", HEAD)]
    assert [p.epochs for p in phases] == [2, 2, 2]
    assert phases[2].frozen_prefix == ("block0",)  # the bottom stage never trains: it is computed once
    assert phases[2].lr == pytest.approx({HEAD: 0.1, "block2": 0.005, "block1": 0.0025})
    # A depth beyond the model's stages unfreezes every stage, no more.
    assert len(_phases("gradual_unfreeze", unfreeze_depth=9)) == len(STAGES) + 1


def test_linear_probe_trains_the_head_alone_on_the_whole_frozen_body():
    (phase,) = _phases("linear_probe", head_lr_scale=3)
    assert phase.trainable == (HEAD,) and phase.frozen_prefix == tuple(STAGES) and phase.suffix == ()
    assert phase.lr == pytest.approx({HEAD: 0.03}) and phase.epochs == 12


def test_epochs_split_evenly_with_the_remainder_last_or_as_given():
    assert [p.epochs for p in _phases("layerwise", epochs=10)] == [2, 2, 3, 3]
    assert [p.epochs for p in _phases("layerwise", phase_epochs=[1, 1, 2, 6])] == [1, 1, 2, 6]
    assert schedule_epochs(ScheduleConfig(kind=ScheduleKind.layerwise, phase_epochs=[1, 1, 2, 6]), 12) == 10


def test_custom_phases_resolve_names_rates_and_aux_heads():
    cfg = ScheduleConfig(kind=ScheduleKind.custom, phases=[
        PhaseConfig(trainable=["block0"], output="block0", epochs=2),
        PhaseConfig(trainable=["*"], epochs=3, lr_scale=0.5, stage_lr_scale={"block0": 0.1}),
    ])
    first, second = expand_schedule(cfg, STAGES, epochs=99, lr=0.01)
    assert first.trainable == ("block0", AUX) and first.path == ("block0",)
    assert second.lr == pytest.approx({"block0": 0.0005, "block1": 0.005, "block2": 0.005, HEAD: 0.005})
    assert schedule_epochs(cfg, 99) == 5


@pytest.mark.parametrize("schedule,message", [
    (dict(kind="layerwise", phase_epochs=[1, 2]), "schedule.phase_epochs"),
    (dict(kind="custom", phases=[{"trainable": ["nope"]}]), "schedule.phases[0].trainable"),
    (dict(kind="custom", phases=[{"trainable": ["block1"], "output": "block0"}]), "schedule.phases[0].trainable"),
    (dict(kind="custom", phases=[{"output": "block9"}]), "schedule.phases[0].output"),
    (dict(kind="custom"), "schedule.phases"),
    (dict(kind="layerwise", lr_decay=1.5), "schedule.lr_decay"),
    (dict(kind="sideways"), "schedule.kind"),
])
def test_bad_schedules_fail_when_the_config_is_built(schedule, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        to_config({"model": {"hidden": [8, 8, 8]}, "schedule": schedule})


def test_too_few_epochs_for_the_phases_names_train_epochs():
    with pytest.raises(ValueError, match="train.epochs must be >= 3"):
        to_config(PipelineConfig(train=TrainConfig(epochs=2), schedule=ScheduleConfig(kind=ScheduleKind.layerwise)))


def test_pipeline_batches_must_split_into_microbatches():
    with pytest.raises(ValueError, match="parallel.microbatches"):
        to_config(PipelineConfig(train=TrainConfig(batch_size=30),
                                 parallel=ParallelConfig(strategy=ParallelStrategy.pipeline, microbatches=4)))


def test_builtin_stage_names_match_the_built_models():
    for model in (ModelConfig(hidden=[8, 8]), ModelConfig(name=BuiltinModel.cnn, channels=[4, 4], hidden=[8])):
        assert builtin_stage_names(model) == build_model(model, [1, 8, 8], 10).stage_names


def _phase_model(kind, index):
    torch.manual_seed(0)
    model = build_model(ModelConfig(hidden=[16, 12, 10], dropout=0.5), [8], 3)
    phases = expand_schedule(ScheduleConfig(kind=kind), model.stage_names, epochs=4, lr=0.1)
    aux = make_aux_heads(model, phases, 3, seed=0)
    return model, aux, phases, PhaseModel(model, aux, phases[index])


def test_phase_model_freezes_all_but_the_trainable_modules():
    model, aux, phases, phase_model = _phase_model("layerwise", 1)
    trainable = {n for n, p in [*model.named_parameters(), *aux.named_parameters()] if p.requires_grad}
    assert trainable == {"stages.block1.0.weight", "stages.block1.0.bias", "block1.1.weight", "block1.1.bias"}
    assert [g["name"] for g in phase_model.param_groups()] == ["block1", AUX]
    phase_model.train()
    assert not model.stages["block0"].training and model.stages["block1"].training


def test_cached_prefix_equals_recomputing_it_even_with_dropout():
    _, _, _, phase_model = _phase_model("gradual_unfreeze", 1)
    x = torch.randn(50, 8)
    phase_model.train()  # frozen stages stay in eval: dropout off, so a cache is exact
    torch.testing.assert_close(phase_model.cached_features(x, chunk=7), phase_model.features(x), rtol=0, atol=1e-6)


def test_compute_counts_the_frozen_prefix_once_when_cached():
    model, aux, phases, _ = _phase_model("gradual_unfreeze", 0)
    flops = forward_flops(model, aux)
    assert flops["block0"] == pytest.approx(2 * 8 * 16) and flops[HEAD] == pytest.approx(2 * 10 * 3)
    phase = phases[0]  # head only, on three frozen stages
    cached, recomputed = Compute(), Compute()
    add_cache_compute(cached, phase, flops, 100)
    for _ in range(3):
        add_epoch_compute(cached, phase, flops, 100, cached=True)
        add_epoch_compute(recomputed, phase, flops, 100, cached=False)
    body = flops["block0"] + flops["block1"] + flops["block2"]
    assert cached.flops == pytest.approx(100 * body + 3 * 100 * 3 * flops[HEAD])
    assert recomputed.flops == pytest.approx(3 * 100 * (body + 3 * flops[HEAD]))
    assert cached.backward_passes == recomputed.backward_passes == 3 * 100  # only the head
    assert cached.forward_passes == 100 * 3 + 3 * 100 and recomputed.forward_passes == 3 * 100 * 4


def test_search_space_can_sweep_the_schedule():
    cfg = PipelineConfig(schedule=ScheduleConfig(kind=ScheduleKind.layerwise))
    cfg = dataclasses.replace(cfg, tune=dataclasses.replace(cfg.tune, search_space={
        "schedule": {"phase_epochs": ["choice", [2, 2, 8], [4, 4, 4]], "lr_decay": ["uniform", 0.5, 1.0]}}))
    to_config(cfg)  # validates the paths
    from orchestrator.training.sweep import longest_trial

    assert longest_trial(cfg) == 12
