"""Version references (no Ray): every accepted form parses one way, bad forms fail with a message naming
them, and the registry, the config checks and jobs.rollout take a reference wherever a version is named."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import rollout
from orchestrator.config import OptimizeConfig, PipelineConfig, RegistryConfig, ServeConfig, validate
from orchestrator.registry import ModelRef, ModelRegistry, RegistryError, parse_ref, signature_for


@pytest.mark.parametrize("text, model, selector", [
    ("models:/digits@production", "digits", "production"),
    ("models:/digits/3", "digits", "3"),
    ("models:/digits/latest", "digits", "latest"),
    ("digits:3", "digits", "3"),
    ("digits:latest", "digits", "latest"),
    ("digits@production", "digits", "production"),
    ("text-lm.v2@candidate", "text-lm.v2", "candidate"),
    ("3", None, "3"),
    (3, None, "3"),
    ("production", None, "production"),
    ("latest", None, "latest"),
])
def test_every_form_parses_and_prints_back_canonically(text, model, selector):
    ref = parse_ref(text)
    assert ref == ModelRef(model, selector)
    assert ref.version == (int(selector) if selector.isdigit() else None)
    assert parse_ref(str(ref)) == ref
    if model is not None:
        assert str(ref).startswith(f"models:/{model}")


@pytest.mark.parametrize("text, why", [
    ("", "invalid version or alias ''"),
    ("models:/", "needs '/<version>' or '@<alias>'"),
    ("models:/digits", "needs '/<version>' or '@<alias>'"),
    ("models:/digits/", "after '/' comes a version number"),
    ("models:/digits/production", "after '/' comes a version number"),
    ("models:/digits/3/4", "after '/' comes a version number"),
    ("digits:production", "after ':' comes a version number"),
    ("digits:3:4", "after ':' comes a version number"),
    ("digits@3", "after '@' comes an alias"),
    ("digits@", "invalid version or alias ''"),
    ("@production", "invalid model name ''"),
    ("..@production", "invalid model name '..'"),
    ("digits@prod@x", "invalid version or alias 'prod@x'"),
    ("a/b", "invalid version or alias 'a/b'"),
    (" 3", "invalid version or alias ' 3'"),
])
def test_bad_forms_fail_naming_the_reference_and_the_forms(text, why):
    with pytest.raises(ValueError) as err:
        parse_ref(text)
    assert f"bad model reference {text!r}" in str(err.value) and why in str(err.value)
    assert "models:/<model>@<alias>" in str(err.value)


@pytest.fixture
def registry(tmp_path):
    registry = ModelRegistry(tmp_path.as_uri())
    for seed in (0, 1):
        weights = {"w": np.random.default_rng(seed).normal(size=(2, 2)).astype(np.float32)}
        registry.register("digits", weights, metrics={}, config={}, lineage={}, signature=signature_for([2], 2),
                          files={"vocab.txt": f"v{seed + 1}".encode()})
    registry.set_alias("digits", "production", 1)
    return registry


def test_the_registry_takes_a_reference_wherever_it_takes_a_version(registry):
    assert registry.resolve("models:/digits@production") == 1
    assert registry.resolve("digits", "models:/digits/2") == 2
    assert registry.resolve("digits:latest") == 2
    assert registry.get("digits@production").version == 1
    assert registry.get("digits", "digits:2").version == 2
    version, weights = registry.load("models:/digits/2")
    assert version.version == 2 and np.array_equal(weights["w"], registry.load("digits", 2)[1]["w"])
    assert registry.read_file("digits", "digits@production", "vocab.txt") == b"v1"
    registry.set_alias("digits", "candidate", "models:/digits/2")
    assert registry.aliases("digits") == {"production": 1, "candidate": 2}
    assert registry.get("digits", 1).version == registry.get("digits", "1").version == 1  # callers as before


@pytest.mark.parametrize("call, message", [
    (lambda r: r.get("digits", "other:1"), "names model 'other', not 'digits'"),
    (lambda r: r.resolve("2"), "names no model"),
    (lambda r: r.load("digits", "digits:production"), "after ':' comes a version number"),
    (lambda r: r.get("digits@staging"), "has no alias 'staging'"),
    (lambda r: r.get("models:/nope/1"), "model 'nope' has no versions"),
])
def test_a_reference_the_registry_cannot_follow_is_a_registry_error(registry, call, message):
    with pytest.raises(RegistryError, match=message):
        call(registry)


def test_tags_json_is_the_registrys_own_file(registry):
    with pytest.raises(RegistryError, match="reserved"):
        registry.register("digits", {"w": np.zeros(1, np.float32)}, metrics={}, config={}, lineage={},
                          signature=signature_for([1], 2), files={"tags.json": b"{}"})


def test_config_versions_are_references_to_the_configured_model():
    validate(PipelineConfig(serve=ServeConfig(model_version="models:/digits@production"),
                            optimize=OptimizeConfig(source="digits:3")))
    with pytest.raises(ValueError, match="serve.model_version names model 'text', but registry.model_name is"):
        validate(PipelineConfig(serve=ServeConfig(model_version="text@production")))
    validate(PipelineConfig(serve=ServeConfig(model_version="text@production"),
                            registry=RegistryConfig(model_name="text")))
    with pytest.raises(ValueError, match="optimize.source bad model reference 'digits@3'"):
        validate(PipelineConfig(optimize=OptimizeConfig(source="digits@3")))


def test_rollout_takes_the_model_from_the_reference(capsys):
    def model(*argv):
        return rollout.model_of(rollout.parse_args(list(argv)))

    assert model("start", "models:/text@candidate") == "text"
    assert model("start", "3") == rollout.DEFAULT_MODEL
    assert model("--model", "text", "start", "3") == "text"
    assert model("--model", "text", "status") == "text"
    assert model("start", "text:3", "--model", "text") == "text"
    # Refused before any request: another model than --model, or a malformed reference (a bad command line).
    assert rollout.main(["--url", "http://127.0.0.1:9", "--model", "digits", "start", "text:3"]) == 2
    assert "names model 'text', but --model is 'digits'" in capsys.readouterr().err
    assert rollout.main(["--url", "http://127.0.0.1:9", "start", "digits:candidate"]) == 2
    assert "bad model reference" in capsys.readouterr().err
