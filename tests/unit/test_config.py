"""The config schema and the conf/ tree: every option composes, bad values fail naming the field."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from orchestrator.config import (
    OptimizeMethod,
    Optimizer,
    ParallelStrategy,
    PipelineConfig,
    PipelineSchedule,
    StorageConfig,
    TrainConfig,
    iter_search_space,
    to_config,
    to_dict,
)

CONF = Path(__file__).resolve().parents[2] / "conf"

# Options with a required value left empty in their YAML, and the override that fills it.
REQUIRED = {
    ("data", "parquet"): {"source": "file:///data/digits.parquet"},
    ("model", "custom"): {"_target_": "tests.unit.user_models.sequential_net"},
}
# Options that only make sense together with others (a language model on text), and those others.
LANGUAGE_MODEL = ["task=causal_lm", "data=text", "model=gpt", "tune.metric=val_loss", "tune.mode=min"]
TEXT_CLASSIFIER = ["data=spam", "model=hf"]
COMPANIONS = {("data", "text"): LANGUAGE_MODEL, ("task", "causal_lm"): LANGUAGE_MODEL, ("model", "gpt"): LANGUAGE_MODEL,
              ("data", "spam"): TEXT_CLASSIFIER, ("model", "hf"): TEXT_CLASSIFIER}


def _options():
    for group_dir in sorted(p for p in CONF.iterdir() if p.is_dir() and p.name != "experiment"):
        for option in sorted(group_dir.glob("*.yaml")):
            yield group_dir.name, option.stem


def test_conf_tree_has_every_group():
    groups = {group for group, _ in _options()}
    assert groups >= {"data", "model", "parallel", "scaling", "train", "tune", "serve", "storage", "tracking",
                      "registry"}


@pytest.mark.parametrize(("group", "option"), list(_options()))
def test_every_group_option_composes_to_its_yaml_values(compose, group, option):
    required = REQUIRED.get((group, option), {})
    overrides = [f"{group}={option}", *(f"{group}.{key}={value}" for key, value in required.items())]
    companions = [o for o in COMPANIONS.get((group, option), []) if not o.startswith(f"{group}=")]
    cfg = to_config(compose(overrides + companions))

    assert isinstance(cfg, PipelineConfig)
    section = dataclasses.asdict(getattr(cfg, group))
    path = CONF / group / f"{option}.yaml"
    yaml_values = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(yaml_values, dict)
    if path.read_text().startswith("# @package _global_"):  # an option that also sets other sections
        for other, values in yaml_values.items():
            if other != group:
                assert isinstance(other, str) and isinstance(values, dict)
                assert {k: dataclasses.asdict(getattr(cfg, other))[k] for k in values} == values, f"{option}: {other}"
        yaml_values = yaml_values[group]
    for key, value in {**yaml_values, **required}.items():
        if (group, key) == ("storage", "root"):
            value = StorageConfig(root=value).root  # normalised; see test_storage_root_*
        assert section[key] == value, f"{group}={option}: {group}.{key}"


@pytest.mark.parametrize(("group", "option"), sorted(REQUIRED))
def test_options_with_a_required_value_fail_without_it(compose, group, option):
    (key,) = REQUIRED[(group, option)]
    with pytest.raises(ValueError, match=f"{group}.{key}"):
        to_config(compose([f"{group}={option}"]))


def test_default_composition_selects_the_documented_defaults(compose):
    cfg = to_config(compose([]))
    assert (cfg.data.source, cfg.model.name, cfg.tune.scheduler, cfg.run_name) == ("digits", "mlp", "asha", "default")
    assert cfg.data.input_shape == [1, 8, 8]
    assert cfg.tracking.enabled is True


def test_experiment_smoke_applies_its_values(compose):
    cfg = to_config(compose(["experiment=smoke"]))
    assert cfg.run_name == "smoke"
    assert cfg.train.epochs == 3
    assert (cfg.tune.num_samples, cfg.tune.grace_period) == (2, 1)
    assert cfg.tracking.enabled is False
    # Values the experiment does not mention keep their group defaults.
    assert cfg.train.lr == 0.003 and cfg.tune.scheduler == "asha"


def test_command_line_overrides_win_over_the_experiment(compose):
    cfg = to_config(compose(["experiment=smoke", "train.epochs=5", "scaling=single"]))
    assert cfg.train.epochs == 5
    assert cfg.scaling.num_workers == 1


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("scaling.num_wrkers=3", "num_wrkers"),  # unknown key
        ("train.lr=abc", "train.lr"),  # wrong type
        ("scaling.num_workers=two", "scaling.num_workers"),
        ("tracking.enabled=maybe", "tracking.enabled"),
        # Choice fields are enums: a value not offered fails here, listing the ones that are.
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("model.name=transformer", "model.name"),
        ("parallel.strategy=zero3", "parallel.strategy"),
        ("tracking.mode=sometimes", "tracking.mode"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_at_compose(compose, override, named):
    with pytest.raises(ConfigCompositionException, match=named):
        compose([override])


def test_a_choice_not_offered_fails_at_compose_listing_the_choices(compose):
    with pytest.raises(ConfigCompositionException) as failure:
        compose(["parallel.strategy=zero3"])
    assert "expected one of [ddp, fsdp, pipeline]" in str(failure.value.__cause__)


def test_a_misspelt_experiment_fails_at_compose_listing_the_experiments(compose):
    with pytest.raises(ConfigCompositionException, match="experiment/smok") as failure:
        compose(["experiment=smok"])
    assert "Available options in 'experiment'" in str(failure.value) and "smoke" in str(failure.value)


def test_an_unknown_top_level_key_fails_naming_it_and_the_known_keys(compose):
    composed = compose(["+foo=bar"])  # Hydra adds '+' keys to any config, a structured one included
    with pytest.raises(ValueError, match="foo is not a config key") as failure:
        to_config(composed)
    assert "the top-level keys are task, data, model, parallel" in str(failure.value)
    with pytest.raises(ValueError, match=r"model\.depth is not a config key: model has name, _target_, hidden"):
        to_config(compose(["+model.depth=5"]))


def test_an_unknown_group_option_fails_at_compose(compose):
    with pytest.raises(ConfigCompositionException, match="transformer"):
        compose(["model=transformer"])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["scaling.num_workers=0"], "scaling.num_workers"),
        (["train.epochs=0"], "train.epochs"),
        (["train.lr=-0.1"], "train.lr"),
        (["data.val_fraction=1.5"], "data.val_fraction"),
        (["serve.min_replicas=3", "serve.max_replicas=2"], "serve.max_replicas"),
        (["serve.port=70000"], "serve.port"),
        (["tune.reduction_factor=1"], "tune.reduction_factor"),
        (["registry.model_name=a/b"], "registry.model_name"),
        (["registry.model_name=.."], "registry.model_name"),
        (["registry.promote_alias=7"], "registry.promote_alias"),
        (["registry.promote_alias=candidate"], "registry.promote_alias"),
        (["registry.promote_margin=-0.01"], "registry.promote_margin"),
        (["data.test_fraction=0.85"], "data.test_fraction"),
        (["tune.search_space.train.lr=[bogus,1]"], "tune.search_space.train.lr"),
        (["tune.search_space.train.lr=0.01"], "tune.search_space.train.lr"),
        (["tune.search_space.train.lr=[uniform,0.1,0.01]"], "tune.search_space.train.lr"),
        (["tune.search_space.train.lr=[uniform,a,1]"], "tune.search_space.train.lr"),
        (["tune.search_space.train.lr=[loguniform,0,1]"], "tune.search_space.train.lr"),
        (["tune.search_space.train.batch_size=[choice]"], "tune.search_space.train.batch_size"),
        (["+tune.search_space.model.foo=[uniform,0,1]"], "tune.search_space.model.foo"),
        (["+tune.search_space.nowhere.lr=[uniform,0,1]"], "tune.search_space.nowhere.lr"),
    ],
)
def test_out_of_range_values_fail_in_to_config_naming_the_field(compose, overrides, named):
    composed = compose(overrides)  # the schema's types are fine; the range check is the dataclass's
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        to_config(composed)


def test_a_new_search_space_leaf_on_a_real_field_is_accepted(compose):
    cfg = to_config(compose(["+tune.search_space.model.dropout=[uniform,0,0.3]",
                             "tune.search_space.train.lr=[choice,0.01,0.003]"]))
    leaves = dict(iter_search_space(cfg.tune.search_space))
    assert leaves["model.dropout"] == ["uniform", 0, 0.3]
    assert leaves["train.lr"] == ["choice", 0.01, 0.003]
    assert leaves["train.batch_size"] == ["choice", 32, 64]  # untouched leaves stay


def test_iter_search_space_yields_dotted_paths_of_leaves():
    space = {"train": {"lr": ["uniform", 0, 1]}, "model": {"hidden": ["choice", [8], [16, 8]]}, "top": ["grid", 1]}
    assert list(iter_search_space(space)) == [
        ("train.lr", ["uniform", 0, 1]),
        ("model.hidden", ["choice", [8], [16, 8]]),
        ("top", ["grid", 1]),
    ]


def test_to_config_applies_nested_dotted_overrides_to_a_copy():
    base = PipelineConfig()
    changed = to_config(base, {"train.lr": 0.01, "model.hidden": [8, 4], "scaling.num_workers": 1, "run_name": "x"})

    assert (changed.train.lr, changed.model.hidden) == (0.01, [8, 4])
    assert (changed.scaling.num_workers, changed.run_name) == (1, "x")
    assert changed.train.epochs == base.train.epochs  # siblings of an overridden field are kept
    assert (base.train.lr, base.model.hidden, base.run_name) == (0.003, [128, 64], "default")  # original untouched


def test_an_override_can_replace_a_dict_field_whole():
    space = {"train": {"lr": ["choice", 0.001]}}
    assert to_config(PipelineConfig(), {"tune.search_space": space}).tune.search_space == space


def test_a_dict_on_a_section_sets_only_the_fields_it_names():
    cfg = to_config(PipelineConfig(), {"serve": {"port": 9000, "auth": {"enabled": False}}})
    assert (cfg.serve.port, cfg.serve.auth.enabled, cfg.serve.max_replicas) == (9000, False, 2)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"train.lr": -1.0}, "train.lr"),
        ({"data.val_fraction": 0.0}, "data.val_fraction"),
        ({"run_name": "a b"}, "run_name"),
        ({"tune.search_space": {"model": {"foo": ["uniform", 0, 1]}}}, "tune.search_space.model.foo"),
        ({"train.optimiser": "sgd"}, "train.optimiser"),  # a misspelt key is refused, not added
        ({"parallel.strategy": "zero3"}, "parallel.strategy"),
        ({"train.lr": "fast"}, "train.lr"),
    ],
)
def test_overrides_are_revalidated(overrides, named):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        to_config(PipelineConfig(), overrides)


def test_to_config_validates_a_config_composed_without_the_schema():
    plain = OmegaConf.create({"train": {"epochs": 2, "lr": 0.1}, "run_name": "plain"})
    cfg = to_config(plain)
    assert isinstance(cfg.train, TrainConfig) and (cfg.train.epochs, cfg.train.lr, cfg.run_name) == (2, 0.1, "plain")
    with pytest.raises(ValueError, match=r"train\.epochs"):
        to_config(OmegaConf.create({"train": {"epochs": 0}}))


def test_to_dict_and_to_config_round_trip(compose):
    cfg = to_config(compose(["model=custom", "model._target_=tests.unit.user_models.TwoLayerNet",
                             "+model.kwargs.width=5", "data=synthetic"]))
    rebuilt = to_config(to_dict(cfg))
    assert rebuilt == cfg
    assert rebuilt.model._target_ == "tests.unit.user_models.TwoLayerNet" and rebuilt.model.kwargs == {"width": 5}


def test_storage_root_relative_file_url_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert StorageConfig(root="file://./runs").root == f"file://{tmp_path}/runs"
    assert StorageConfig(root="nested/runs").root == f"file://{tmp_path}/nested/runs"
    assert StorageConfig(root="file:///abs/runs").root == "file:///abs/runs"
    assert StorageConfig(root="s3://bucket/runs").root == "s3://bucket/runs"
    assert StorageConfig(root="memory://runs").root == "memory://runs"


def test_composed_local_storage_root_is_absolute(compose, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert to_config(compose(["storage=local"])).storage.root == f"file://{tmp_path}/runs"


def test_one_epoch_runs_are_valid_even_with_the_default_asha_grace_period(compose):
    # ASHA clamps its grace period to the run's length; a plain train job must not be refused for it.
    cfg = to_config(compose(["train.epochs=1"]))
    assert cfg.train.epochs == 1 and cfg.tune.grace_period > cfg.train.epochs


def test_choices_are_enums_that_serialize_as_the_strings_users_type(compose):
    cfg = to_config(compose(["parallel=pipeline", "parallel.pipeline_schedule=gpipe", "optimize=int8"]))
    assert cfg.parallel.strategy is ParallelStrategy.pipeline
    assert cfg.parallel.pipeline_schedule is PipelineSchedule("gpipe")
    assert cfg.optimize.methods == [OptimizeMethod.int8_dynamic, OptimizeMethod.int8_static]
    assert cfg.parallel.strategy == "pipeline" and f"{cfg.parallel.pipeline_schedule}" == "gpipe"
    plain = to_dict(cfg)
    assert plain["parallel"]["strategy"] == "pipeline" and type(plain["parallel"]["strategy"]) is str
    assert plain["optimize"]["methods"] == ["int8_dynamic", "int8_static"]
    assert OmegaConf.to_yaml(OmegaConf.create(plain))  # YAML- and JSON-friendly: nothing but plain values
    assert to_config(json.loads(json.dumps(plain))) == cfg


def test_a_config_stored_as_strings_before_the_enums_still_loads():
    # A registry manifest written before choice fields were enums stored them as plain strings.
    stored = json.loads(json.dumps(dataclasses.asdict(PipelineConfig())))
    stored["parallel"].update(strategy="pipeline", pipeline_schedule="1f1b", microbatches=2)
    stored["optimize"]["methods"] = ["distill"]
    cfg = to_config(stored)
    assert cfg.parallel.pipeline_schedule is PipelineSchedule("1f1b")
    assert cfg.optimize.methods == [OptimizeMethod.distill]


def test_python_built_configs_turn_choice_strings_into_enums_naming_a_bad_one():
    # Strings on purpose: Python callers may pass them, and __post_init__ converts or names the field.
    assert TrainConfig(optimizer="sgd").optimizer is Optimizer.sgd  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"train\.optimizer must be one of \['adam', 'adamw', 'sgd'\]"):
        TrainConfig(optimizer="rmsprop")  # type: ignore[arg-type]


def test_the_config_package_imports_neither_torch_nor_ray_nor_training():
    code = (
        "import sys; from orchestrator.config import to_config; to_config({'train': {'lr': 0.01}}); "
        "print(sorted(m for m in ('torch', 'ray', 'orchestrator.training') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(("overrides", "field"), [
    (["task=causal_lm"], "data.kind"),                                        # a language model needs text
    (["data=text", "model=gpt"], "data.kind"),                                # text needs task=causal_lm
    (["task=causal_lm", "data=text"], "model.name"),                          # an mlp is no language model
    (["task=causal_lm", "data=text", "model=gpt"], "tune.metric"),            # val_accuracy is not reported
    (LANGUAGE_MODEL + ["data.context=512"], "data.context"),                  # longer than the model's positions
    (LANGUAGE_MODEL + ["parallel=pipeline", "parallel.microbatches=2"], "model.tie_embeddings"),
    (LANGUAGE_MODEL + ["optimize=int8"], "optimize.methods"),
])
def test_task_data_and_model_must_fit_together_before_ray_starts(compose, overrides, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        to_config(compose(overrides))


def test_the_language_model_recipes_compose(compose):
    cpu = to_config(compose(["experiment=code_lm"]))
    assert (cpu.task.name, cpu.data.source, cpu.model.name, cpu.tune.metric) == (
        "causal_lm", "stdlib", "gpt", "val_bits_per_byte")
    assert [path for path, _ in iter_search_space(cpu.tune.search_space)] == ["train.lr"]  # nulls drop the defaults
    gpu = to_config(compose(["experiment=code_lm_gpu"]))
    assert (gpu.parallel.strategy, gpu.parallel.backend, gpu.train.precision, gpu.scaling.use_gpu) == (
        "fsdp", "nccl", "bf16", True)
    assert (gpu.model.layers, gpu.model.width, gpu.model.context) == (12, 768, 1024)
