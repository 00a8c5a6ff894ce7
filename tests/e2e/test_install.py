"""The project as a user installs it: a wheel in a fresh virtualenv, jobs run from a folder far from
the checkout. Catches what the checkout hides: conf/ or the KubeRay CRDs missing from the wheel, a
job that finds its config only beside the sources."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support import REPO, free_port, last_json_line

pytestmark = pytest.mark.slow

# What a wheel is built from (the same list cluster/kuberay/Dockerfile copies).
BUILD_INPUTS = ["pyproject.toml", "README.md", "orchestrator", "jobs", "serve", "conf"]


def _clean_env() -> dict:
    """This environment less what could reach the checkout: with the repository on PYTHONPATH (the
    integration tier puts it there for Ray's workers), pip finds the checkout's egg-info, says
    "already satisfied" and installs nothing."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PYTHONPATH")}
    env.update(WANDB_MODE="offline", RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    return env


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    kwargs.setdefault("env", _clean_env())
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def _build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources: building never writes build/ or *.egg-info into the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", str(tmp / "dist"), str(src)], timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("orchestrator-*.whl")
    return wheel


def _venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A fresh virtualenv holding the wheel; its dependencies come from this environment's site-packages,
    made visible by a .pth file (read as a plain path: this environment's own .pth files, among them the
    editable install of the checkout, are not processed), so nothing is downloaded."""
    venv = tmp / "venv"
    created = _run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = _run([str(python), "-c", purelib]).stdout.strip()
    Path(site_packages, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(python of a fresh virtualenv with the wheel installed, an empty working folder outside the checkout,
    the environment for its jobs: no PYTHONPATH, so nothing can come from the checkout)."""
    tmp = tmp_path_factory.mktemp("install")
    assert REPO not in tmp.parents, "the install must live outside the checkout"
    python = _venv_with_wheel(tmp, _build_wheel(tmp))
    cwd = tmp / "work"
    cwd.mkdir()
    return python, cwd, _clean_env()


def test_installed_modules_come_from_the_new_virtualenv(installed):
    python, cwd, env = installed
    probe = ("import json, conf, jobs, orchestrator, serve; "
             "print(json.dumps({m.__name__: m.__file__ for m in (conf, jobs, orchestrator, serve)}))")
    proc = _run([str(python), "-c", probe], cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    venv = python.parents[1]
    for name, file in json.loads(proc.stdout).items():
        assert venv in Path(file).parents, f"{name} imported from {file}, not from {venv}"
        assert REPO not in Path(file).parents, f"{name} imported from the checkout: {file}"


def test_installed_export_writes_three_manifests(installed):
    python, cwd, env = installed
    out = cwd / "k8s"
    proc = _run([str(python), "-m", "jobs.export", f"export.out_dir={out}", "storage.root=s3://bucket/x",
                 "serve.host=0.0.0.0"], cwd=cwd, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = last_json_line(proc.stdout)
    assert summary["manifests"] == [str(out / f"{kind}.yaml") for kind in ("raycluster", "rayjob", "rayservice")]
    assert sorted(p.name for p in out.iterdir()) == ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]


def test_installed_pipeline_runs_end_to_end(installed):
    python, cwd, env = installed
    root = cwd / "runs"
    proc = _run([str(python), "-m", "jobs.pipeline", "experiment=smoke", "serve.block=false",
                 f"storage.root=file://{root}", f"serve.port={free_port()}"], cwd=cwd, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    assert summary["model"] == "digits" and summary["version"] == 1
    assert (root / "registry" / "digits" / "versions" / "1" / "manifest.json").exists()
