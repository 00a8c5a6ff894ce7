"""The language-model recipe driven from outside: `python -m jobs.pipeline experiment=code_lm`, shrunk to a
tiny corpus and model, as a subprocess: sweep, register with test bits per byte beside gzip and xz,
no endpoint; then `jobs.deploy` of that version refuses clearly."""

import pytest

from tests.support import last_json_line, run_job

pytestmark = pytest.mark.slow

TINY = [
    "data.max_files=30", "data.vocab_size=512", "data.context=32",
    "model.layers=2", "model.heads=2", "model.width=32", "model.context=32",
    "train.epochs=2", "train.steps_per_epoch=10", "train.warmup_steps=2", "train.batch_size=16", "train.val_batches=4",
]


def test_code_lm_recipe_sweeps_registers_and_reports_bits_per_byte_against_gzip_and_xz(tmp_path):
    proc = run_job("pipeline", "experiment=code_lm", "serve.block=false", f"storage.root=file://{tmp_path}", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    assert summary["model"] == "code_lm" and summary["version"] == 1
    assert summary["endpoint"] is None  # language models are registered, not served over HTTP yet
    assert summary["best_config"]["train.lr"] in (0.002, 0.004)  # the recipe's 2-trial grid
    for split in ("val", "test"):
        assert 0 < summary[f"{split}_bits_per_byte"] < 8, summary
        # 30 files hold too little text for xz to beat gzip (the full recipe's figures are in bench/README.md).
        assert 1.0 < summary[f"{split}_xz_bits_per_byte"] < 4.0 and 1.0 < summary[f"{split}_gzip_bits_per_byte"] < 4.0
    assert summary["params"] > 30_000 and summary["tokens_seen"] > 0

    deploy = run_job("deploy", "experiment=code_lm", f"storage.root=file://{tmp_path}", "serve.block=false",
                     "serve.model_version=1")
    assert deploy.returncode != 0
    assert "is a causal_lm model" in deploy.stderr, deploy.stderr[-3000:]
