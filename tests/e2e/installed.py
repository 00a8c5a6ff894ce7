"""The project as a user installs it: a wheel built from a copy of the sources, installed into a fresh
virtualenv outside the checkout, with jobs run from a folder far from it. tests/e2e/conftest.py makes one
per session (`installed`); the main job's e2e run (tests/e2e/test_jobs.py) and the install checks
(tests/e2e/test_install.py) use it."""

import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO, job_env

# What a wheel is built from (the same list cluster/kuberay/Dockerfile copies).
BUILD_INPUTS = ["pyproject.toml", "README.md", "orchestrator", "jobs", "serve", "conf"]


def run(args, **kwargs) -> subprocess.CompletedProcess:
    """A subprocess with `job_env(with_repo=False)` unless `env` is given; its output captured as text.
    Never with the repository on PYTHONPATH (the integration tier puts it there for Ray's workers): pip
    would find the checkout's egg-info, say "already satisfied" and install nothing."""
    kwargs.setdefault("env", job_env(with_repo=False))
    return subprocess.run(args, capture_output=True, text=True, **kwargs)


def build_wheel(tmp: Path) -> Path:
    """The wheel of a copy of the sources: building never writes build/ or *.egg-info into the checkout."""
    src = tmp / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / name, src / name)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", str(tmp / "dist"), str(src)], timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("orchestrator-*.whl")
    return wheel


def venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A fresh virtualenv holding the wheel; its dependencies come from this environment's site-packages,
    made visible by a .pth file (read as a plain path: this environment's own .pth files, among them the
    editable install of the checkout, are not processed), so nothing is downloaded."""
    venv = tmp / "venv"
    created = run([sys.executable, "-m", "venv", str(venv)], timeout=300)
    assert created.returncode == 0, created.stderr
    python = venv / "bin" / "python"
    installed = run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], timeout=300)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site_packages = run([str(python), "-c", purelib]).stdout.strip()
    Path(site_packages, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@dataclass(frozen=True)
class Installed:
    """A fresh virtualenv holding the wheel, and where and how its jobs run."""

    python: Path
    """The virtualenv's interpreter."""
    cwd: Path
    """An empty working folder outside the checkout."""
    env: dict
    """The jobs' environment: no PYTHONPATH, so nothing can come from the checkout."""

    def job(self, verb: str, *overrides: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """`python -m jobs.<verb> overrides...` from the installed package."""
        return run([str(self.python), "-m", f"jobs.{verb}", *overrides], cwd=self.cwd, env=self.env, timeout=timeout)


def install(tmp: Path) -> Installed:
    """Build the wheel and install it into a new virtualenv under `tmp` (which must lie outside the checkout)."""
    assert REPO not in tmp.parents, "the install must live outside the checkout"
    python = venv_with_wheel(tmp, build_wheel(tmp))
    cwd = tmp / "work"
    cwd.mkdir()
    return Installed(python=python, cwd=cwd, env=job_env(with_repo=False))
