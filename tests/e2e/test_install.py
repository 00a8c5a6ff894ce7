"""The project as a user installs it (tests/e2e/installed.py): a wheel in a fresh virtualenv, jobs run
from a folder far from the checkout. Catches what the checkout hides: conf/ or the KubeRay CRDs missing
from the wheel, a job that finds its config only beside the sources. The installed package also runs the
main job end to end: tests/e2e/test_jobs.py's `pipeline_run` is that run."""

import json
from pathlib import Path

import pytest

from tests.e2e.installed import run
from tests.support import REPO, last_json_line

pytestmark = pytest.mark.slow


def test_installed_modules_come_from_the_new_virtualenv(installed):
    probe = ("import json, conf, jobs, orchestrator, serve; "
             "print(json.dumps({m.__name__: m.__file__ for m in (conf, jobs, orchestrator, serve)}))")
    proc = run([str(installed.python), "-c", probe], cwd=installed.cwd, env=installed.env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    venv = installed.python.parents[1]
    for name, file in json.loads(proc.stdout).items():
        assert venv in Path(file).parents, f"{name} imported from {file}, not from {venv}"
        assert REPO not in Path(file).parents, f"{name} imported from the checkout: {file}"


def test_installed_export_writes_three_manifests(installed):
    out = installed.cwd / "k8s"
    proc = installed.job("export", f"export.out_dir={out}", "storage.root=s3://bucket/x", "serve.host=0.0.0.0",
                         timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert summary["manifests"] == [str(out / f"{kind}.yaml") for kind in ("raycluster", "rayjob", "rayservice")]
    assert sorted(p.name for p in out.iterdir()) == ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
