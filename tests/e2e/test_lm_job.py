"""The language-model recipe driven from outside: `python -m jobs.pipeline experiment=code_lm`, shrunk to a
tiny corpus and model, as a subprocess: sweep, register with test bits per byte beside gzip and xz, deploy,
and check the OpenAI-compatible endpoint's greedy completion (whole and streamed) against the same greedy
generation run in the job's process on the registry weights."""

import pytest

from tests.support import free_port, last_json_line, run_job

pytestmark = pytest.mark.slow

TINY = [
    "data.max_files=30", "data.vocab_size=512", "data.context=32",
    "model.layers=2", "model.heads=2", "model.width=32", "model.context=32",
    "train.epochs=2", "train.steps_per_epoch=10", "train.warmup_steps=2", "train.batch_size=16", "train.val_batches=4",
]


def test_code_lm_recipe_sweeps_registers_and_reports_bits_per_byte_against_gzip_and_xz(tmp_path):
    port = free_port()
    proc = run_job("pipeline", "experiment=code_lm", "serve.block=false", f"storage.root=file://{tmp_path}",
                   f"serve.port={port}", *TINY)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = last_json_line(proc.stdout)
    assert summary["model"] == "code_lm" and summary["version"] == 1
    assert summary["openai_base_url"] == f"http://127.0.0.1:{port}/v1"
    check = summary["endpoint_check"]
    assert check["greedy_matches_in_process"] and check["stream_matches"] and check["completion_tokens"] == 16
    assert summary["best_config"]["train.lr"] in (0.002, 0.004)  # the recipe's 2-trial grid
    for split in ("val", "test"):
        assert 0 < summary[f"{split}_bits_per_byte"] < 8, summary
        # 30 files hold too little text for xz to beat gzip (the full recipe's figures are in bench/README.md).
        assert 1.0 < summary[f"{split}_xz_bits_per_byte"] < 4.0 and 1.0 < summary[f"{split}_gzip_bits_per_byte"] < 4.0
    assert summary["params"] > 30_000 and summary["tokens_seen"] > 0
