"""Text through Ray Data: documents tokenized in map_batches into Parquet token blocks that decode back to
the documents, stored once per digest, read back lazily in the same order."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.config import DataConfig, DataKind, TokenizerKind
from orchestrator.registry import storage
from orchestrator.training.data import DatasetInfo, prepare_dataset, ray_datasets
from orchestrator.training.text import (
    BOS_ID,
    PAD_ID,
    list_documents,
    load_tokenizer,
    read_documents,
    split_documents,
    training_order,
)

STDLIB = DataConfig(kind=DataKind.text, source="stdlib", max_files=30, context=64, vocab_size=512)


@pytest.fixture(scope="module")
def stdlib(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("text-root").as_uri()
    return root, prepare_dataset(STDLIB, root)


def _rows(info: DatasetInfo, split: str) -> Dict[str, np.ndarray]:
    batches = list(ray_datasets(info, [split])[split].iter_batches(batch_size=None, batch_format="numpy"))
    return {c: np.concatenate([b[c] for b in batches]) for c in ("tokens", "nbytes")}


def _documents_of(rows: Dict[str, np.ndarray], decode) -> List[bytes]:
    """Rows cut back into documents: a document's first row starts with BOS; targets are tokens[1:]."""
    starts = [*np.flatnonzero(rows["tokens"][:, 0] == BOS_ID), len(rows["tokens"])]
    documents = []
    for begin, end in zip(starts, starts[1:]):
        targets = rows["tokens"][begin:end, 1:].reshape(-1)
        documents.append(decode(targets[targets != PAD_ID].tolist()))
    return documents


def _split_texts(cfg: DataConfig, split: str) -> List[bytes]:
    """A split's documents in the order they are written: val and test in corpus order, train (repeats included)
    in its seeded training order."""
    refs = list_documents(cfg)
    members = split_documents(len(refs), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)[split]
    if split == "train":
        members = [members[i] for i in training_order(len(members), cfg.repeat, cfg.split_seed)]
    return list(read_documents([refs[i] for i in members], cfg.text_column))


def test_stdlib_splits_decode_back_to_their_documents(stdlib):
    _, info = stdlib
    tokenizer = load_tokenizer(info.tokenizer_url)
    assert (info.kind, info.input_shape, info.num_classes, tokenizer.vocab_size) == ("text", [64], 512, 512)
    assert info.files == {"train": 21, "val": 6, "test": 3}
    for split, count in (("train", info.num_train), ("val", info.num_val), ("test", info.num_test)):
        rows = _rows(info, split)
        texts = _split_texts(STDLIB, split)
        assert len(rows["tokens"]) == count and rows["tokens"].shape[1] == 65
        assert _documents_of(rows, tokenizer.decode) == texts
        assert int(rows["nbytes"].sum()) == info.split_bytes[split] == sum(map(len, texts))
        assert int((rows["tokens"][:, 1:] != PAD_ID).sum()) == info.split_tokens[split]
    assert sorted(info.baselines) == [f"{s}_{c}_bits_per_byte" for s in ("test", "val") for c in ("gzip", "xz")]
    assert all(1.0 < bits < 4.0 for bits in info.baselines.values())  # 3 files: too little text for xz to beat gzip


def test_second_prepare_reuses_the_dataset_and_rows_keep_their_order(stdlib):
    root, info = stdlib
    first = _rows(info, "train")
    assert prepare_dataset(STDLIB, root) == info
    again = _rows(info, "train")
    assert np.array_equal(first["tokens"], again["tokens"]) and np.array_equal(first["nbytes"], again["nbytes"])


def test_workers_get_int_token_blocks(stdlib):
    _, info = stdlib
    batch = next(iter(ray_datasets(info)["train"].iter_torch_batches(batch_size=8)))
    assert batch["tokens"].dtype == torch.int32 and batch["tokens"].shape == (8, 65)
    assert batch["tokens"][0, 0].item() == BOS_ID


def test_parquet_text_column_with_bytes_tokenizer(ray_cluster, tmp_path):
    texts = [f"row {i}\n" * (i + 1) for i in range(12)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "docs.parquet", row_group_size=5)
    cfg = DataConfig(kind=DataKind.text, source=str(tmp_path / "docs.parquet"), text_column="body",
                     tokenizer=TokenizerKind.bytes, context=16, repeat=2)
    info = prepare_dataset(cfg, (tmp_path / "root").as_uri())
    tokenizer = load_tokenizer(info.tokenizer_url)
    assert (info.vocab_size, info.tokenizer, info.files["train"]) == (258, "bytes", 2 * 9)
    assert _documents_of(_rows(info, "train"), tokenizer.decode) == _split_texts(cfg, "train")
    assert sorted(_split_texts(cfg, "train")) == sorted(_split_texts(dataclasses.replace(cfg, repeat=1), "train") * 2)
    assert _documents_of(_rows(info, "val"), tokenizer.decode) == _split_texts(cfg, "val")


def test_text_files_on_s3_are_read_and_written_by_ray_workers(ray_cluster, s3_server):
    """A folder of text files in a bucket becomes token blocks in the bucket: Ray's tasks read and write S3."""
    root = f"s3://{s3_server.bucket}/text-{uuid.uuid4().hex[:8]}"
    texts = {f"src/m{i}.py": f"x = {i}\n" * (3 * i + 1) for i in range(8)}
    for name, text in texts.items():
        storage.write_bytes_atomic(storage.join(root, name), text.encode())
    storage.write_bytes_atomic(storage.join(root, "src/notes.txt"), b"not python")
    cfg = DataConfig(kind=DataKind.text, source=storage.join(root, "src"), tokenizer=TokenizerKind.bytes, context=8)
    info = prepare_dataset(cfg, root)
    assert info.url.startswith(root) and sum(info.files.values()) == len(texts)
    tokenizer = load_tokenizer(info.tokenizer_url)
    decoded = [d for s in ("train", "val", "test") for d in _documents_of(_rows(info, s), tokenizer.decode)]
    assert sorted(decoded) == sorted(t.encode() for t in texts.values())
