"""`python -m jobs.registry` (no Ray): list, show, diff, alias and tag over a registry of tiny numpy
versions, their --json output read back, and a one-line error with exit code 1 for whatever is unknown."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

import numpy as np
import pytest

from jobs.registry import main
from orchestrator.registry import MANIFEST, ModelRegistry, sha256, signature_for, storage
from orchestrator.registry.curves import CURVES_FILE, training_curves_png
from tests.support import REPO, job_env

LRS = (0.01, 0.02, 0.03)
VAL = (0.80, 0.85, 0.90)
TEST = (0.78, 0.84, 0.88)


def _history(epochs: int):
    return [{"epoch": e, "phase": 0, "train_loss": 1.0 / e, "val_loss": 1.1 / e, "val_accuracy": 0.5 + e / 10}
            for e in range(1, epochs + 1)]


@pytest.fixture
def root(tmp_path):
    """digits v1-v3 (production -> v2; v1 and v3 share their weights) and other v1, without curves."""
    url = tmp_path.as_uri()
    registry = ModelRegistry(url)
    for i, (lr, val, test) in enumerate(zip(LRS, VAL, TEST)):
        weights = {"w": np.random.default_rng(i % 2).normal(size=(3, 2)).astype(np.float32)}
        history = _history(i + 2)
        registry.register("digits", weights, metrics={"val_accuracy": val, "test_accuracy": test, "history": history},
                          config={"train": {"lr": lr, "epochs": 5}}, lineage={"data_digest": "abc"},
                          signature=signature_for([1, 2, 2], 2),
                          files={CURVES_FILE: training_curves_png(history, "classification")})
    registry.set_alias("digits", "production", 2)
    registry.register("other", {"w": np.zeros(2, np.float32)}, metrics={"val_accuracy": 0.5}, config={},
                      lineage={}, signature=signature_for([2], 2))
    return url


def _run(capsys, root, *argv):
    """(exit code, stdout, stderr) of jobs.registry in this process."""
    code = main(["--root", root, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, root, *argv):
    code, out, err = _run(capsys, root, *argv, "--json")
    assert code == 0, err
    assert len(out.strip().splitlines()) == 1  # one document on one line
    return json.loads(out)


def test_list_shows_every_model_with_its_versions_and_aliases(capsys, root):
    models = _json(capsys, root, "list")
    assert models == [{"model": "digits", "versions": 3, "latest": 3, "aliases": {"production": 2}},
                      {"model": "other", "versions": 1, "latest": 1, "aliases": {}}]
    code, out, _ = _run(capsys, root, "list")
    assert code == 0
    assert out.splitlines()[0].split() == ["model", "versions", "latest", "aliases"]
    assert out.splitlines()[1].split() == ["digits", "3", "3", "production=2"]


def test_an_empty_root_lists_no_models(capsys, tmp_path):
    assert _json(capsys, tmp_path.as_uri(), "list") == []
    assert _run(capsys, tmp_path.as_uri(), "list") == (0, "no models\n", "")


def test_list_model_shows_versions_aliases_times_and_headline_metrics(capsys, root):
    versions = _json(capsys, root, "list", "digits")
    assert [v["version"] for v in versions] == [1, 2, 3]
    assert [v["aliases"] for v in versions] == [[], ["production"], []]
    assert [v["metrics"] for v in versions] == [{"val_accuracy": val, "test_accuracy": test}
                                                for val, test in zip(VAL, TEST)]
    manifest = ModelRegistry(root).get("digits", 1).manifest
    stamp = dt.datetime.fromisoformat(manifest["created_at"])
    assert versions[0]["created"] == stamp.strftime("%Y-%m-%d %H:%M:%S")
    code, out, _ = _run(capsys, root, "list", "digits")
    header, *rows = out.splitlines()
    assert header.split() == ["version", "aliases", "created", "variant", "test_accuracy", "val_accuracy", "tags"]
    assert rows[1].split()[:2] == ["2", "production"] and rows[1].split()[-3:] == ["0.84", "0.85", "-"]


def test_show_prints_the_manifest_and_where_the_curves_are(capsys, root):
    shown = _json(capsys, root, "show", "models:/digits@production")
    version = ModelRegistry(root).get("digits", 2)
    assert (shown["model"], shown["version"], shown["aliases"]) == ("digits", 2, ["production"])
    assert shown["manifest"] == version.manifest
    assert shown["training_curves"] == storage.join(version.url, CURVES_FILE)
    assert storage.read_bytes(shown["training_curves"]).startswith(b"\x89PNG\r\n\x1a\n")
    code, out, _ = _run(capsys, root, "show", "digits:2")
    assert code == 0
    assert f"training curves: {shown['training_curves']}" in out.splitlines()
    assert "history: 3 epochs (--json for each)" in out and "lr: 0.02" in out
    assert _json(capsys, root, "show", "other:1")["training_curves"] is None


def test_diff_names_what_differs_and_only_that(capsys, root):
    diff = _json(capsys, root, "diff", "digits:1", "models:/digits@production")
    assert (diff["a"], diff["b"]) == ("models:/digits/1", "models:/digits/2")
    assert diff["config"] == {"train.lr": {"a": 0.01, "b": 0.02}}
    assert set(diff["metrics"]) == {"val_accuracy", "test_accuracy"}  # the history is left to the curves
    assert diff["metrics"]["val_accuracy"]["delta"] == pytest.approx(0.05)
    assert diff["lineage"] == {} and diff["signature"] == {}
    assert diff["weights"]["same"] is False and diff["weights"]["a"] != diff["weights"]["b"]
    assert set(diff["files"]) == {CURVES_FILE}  # 2 and 3 epochs draw different pictures
    # v1 and v3 hold the same weights; a bare second ref is a version of the first's model.
    assert _json(capsys, root, "diff", "digits:1", "3")["weights"]["same"] is True
    same = _json(capsys, root, "diff", "digits:2", "digits@production")
    assert [same[k] for k in ("metrics", "config", "lineage", "signature", "files")] == [{}] * 5
    code, out, _ = _run(capsys, root, "diff", "digits:1", "digits:2")
    assert code == 0 and "train.lr  0.01  0.02" in out and "same: weights format, signature, lineage" in out


def test_alias_moves_then_deletes(capsys, root):
    registry = ModelRegistry(root)
    moved = _json(capsys, root, "alias", "digits:3", "production")
    assert moved == {"model": "digits", "alias": "production", "version": 3, "previous": 2}
    assert registry.aliases("digits") == {"production": 3}
    assert _json(capsys, root, "alias", "models:/digits@production", "candidate")["version"] == 3
    deleted = _json(capsys, root, "alias", "--delete", "digits", "production")
    assert deleted == {"model": "digits", "alias": "production", "deleted": True, "version": 3}
    assert registry.aliases("digits") == {"candidate": 3}
    code, _, err = _run(capsys, root, "alias", "--delete", "digits", "production")
    assert code == 1 and "no alias 'production'" in err


def test_tags_live_beside_the_manifest_which_stays_as_registered(capsys, root):
    registry = ModelRegistry(root)
    manifest_url = storage.join(registry.get("digits", 2).url, MANIFEST)
    before = sha256(storage.read_bytes(manifest_url))
    tagged = _json(capsys, root, "tag", "digits@production", "owner=ml", "note=a=b", "stage=qa")
    assert tagged == {"model": "digits", "version": 2, "tags": {"owner": "ml", "note": "a=b", "stage": "qa"}}
    assert _json(capsys, root, "tag", "digits:2", "--remove", "stage")["tags"] == {"owner": "ml", "note": "a=b"}
    assert sha256(storage.read_bytes(manifest_url)) == before
    assert "tags" not in registry.get("digits", 2).manifest  # get() still verifies it against manifest.sha256
    assert registry.tags("digits", 2) == {"owner": "ml", "note": "a=b"} and registry.tags("digits", 1) == {}
    assert [v["tags"] for v in _json(capsys, root, "list", "digits")] == [{}, {"owner": "ml", "note": "a=b"}, {}]
    assert _json(capsys, root, "show", "digits:2")["tags"] == {"owner": "ml", "note": "a=b"}
    code, _, err = _run(capsys, root, "tag", "digits:2", "--remove", "missing")
    assert code == 1 and "no tags ['missing']" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["--root", root, "tag", "digits:2", "novalue"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("argv, message", [
    (["show", "nope:1"], "model 'nope' has no versions"),
    (["show", "digits:9"], "has no version 9"),
    (["show", "digits@staging"], "has no alias 'staging'"),
    (["show", "digits@3"], "bad model reference 'digits@3'"),
    (["show", "3"], "names no model"),
    (["list", "nope"], "no model 'nope'"),
    (["diff", "digits:1", "digits:9"], "has no version 9"),
    (["alias", "digits:9", "production"], "has no version 9"),
    (["alias", "--delete", "nope", "production"], "no model 'nope'"),
    (["tag", "digits@staging", "a=b"], "has no alias 'staging'"),
    (["--model", "other", "show", "digits:1"], "names model 'digits', not 'other'"),
])
def test_unknown_model_version_or_alias_exits_1_with_one_line(capsys, root, argv, message):
    code, out, err = _run(capsys, root, *argv)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err


def test_bare_versions_take_the_model_from_the_option_before_or_after_the_command(capsys, root):
    assert _json(capsys, root, "--model", "digits", "show", "production")["version"] == 2
    assert _json(capsys, root, "show", "3", "--model", "digits")["version"] == 3
    assert _json(capsys, root, "--json", "show", "other:1")["model"] == "other"  # --json before the command too


def test_the_module_runs_as_a_command(root):
    def command(*argv):
        return subprocess.run([sys.executable, "-m", "jobs.registry", "--root", root, *argv], cwd=REPO,
                              env=job_env(), capture_output=True, text=True, timeout=120)

    listed = command("list", "digits", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [v["version"] for v in json.loads(listed.stdout)] == [1, 2, 3]
    missing = command("show", "digits:9")
    assert missing.returncode == 1 and missing.stderr.strip().startswith("error: ") and missing.stdout == ""
