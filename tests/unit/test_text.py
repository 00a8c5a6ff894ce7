"""Text data on the driver: document listing and order, the split by document, tokenizers, blocking and
the compression baselines. Nothing here starts Ray (tokenization in Ray Data: tests/integration/test_text_data.py)."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import DataConfig, DataKind
from orchestrator.training.data import DatasetInfo
from orchestrator.training.text import (
    BOS_ID,
    PAD_ID,
    ByteTokenizer,
    compression_bits_per_byte,
    document_blocks,
    list_documents,
    list_files,
    read_documents,
    split_documents,
    tokenizer_from_bytes,
    train_bpe,
)

STDLIB = DataConfig(kind=DataKind.text, source="stdlib", max_files=40)


@pytest.fixture(scope="module")
def stdlib_docs():
    return list(read_documents(list_documents(STDLIB), "text"))


@pytest.fixture(scope="module")
def bpe(stdlib_docs):
    return train_bpe(iter(stdlib_docs[:20]), vocab_size=400, count=20)


def _tree(root: Path, names) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"# {name}\n")


def test_list_files_skips_tests_and_site_packages_in_sorted_order(tmp_path):
    kept = ["a.py", "pkg/__init__.py", "pkg/mod.py", "pkg/sub/z.py", "zz.py"]
    dropped = ["test/x.py", "tests/y.py", "pkg/idle_test/w.py", "test_top.py", "pkg/test_mod.py",
               "pkg/test_dir/v.py", "site-packages/s.py", "notes.txt"]
    _tree(tmp_path, reversed(kept + dropped))
    urls = list_files(str(tmp_path), "*.py", skip_tests=True)
    assert [u.split(str(tmp_path) + "/", 1)[1] for u in urls] == kept
    everything = list_files(str(tmp_path), "*.py", skip_tests=False)  # other folders keep their tests
    assert len(everything) == len(kept) + len(dropped) - 1


def test_stdlib_corpus_has_no_tests_and_a_fixed_order():
    urls = [r.url for r in list_documents(DataConfig(kind=DataKind.text, source="stdlib"))]
    assert len(urls) > 300 and urls == sorted(urls)
    parts = {p for u in urls for p in u.split("/")}
    assert not parts & {"test", "tests", "idle_test", "site-packages"}
    assert not [p for p in parts if p.startswith("test_")]
    assert any(u.endswith("/json/decoder.py") for u in urls)
    assert [r.url for r in list_documents(STDLIB)] == urls[:40]


def test_parquet_table_documents_are_its_text_column_in_order(tmp_path):
    texts = [f"doc {i}: " + "x" * i for i in range(7)]
    pq.write_table(pa.table({"text": texts, "n": list(range(7))}), tmp_path / "t.parquet", row_group_size=3)
    refs = list_documents(DataConfig(kind=DataKind.text, source=str(tmp_path / "t.parquet")))
    assert [(r.row_group, r.row) for r in refs][:4] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert list(read_documents(refs, "text")) == [t.encode() for t in texts]
    with pytest.raises(ValueError, match="body"):
        list(read_documents(refs, "body"))
    pq.write_table(pa.table({"text": ["last"]}), tmp_path / "u.parquet")
    for source in (tmp_path, tmp_path / "*.parquet"):  # a folder of Parquet files, or a glob: files in name order
        refs = list_documents(DataConfig(kind=DataKind.text, source=str(source)))
        assert list(read_documents(refs, "text")) == [t.encode() for t in [*texts, "last"]]


def test_split_is_deterministic_disjoint_and_seeded():
    first = split_documents(100, 0.2, 0.1, seed=0)
    assert first == split_documents(100, 0.2, 0.1, seed=0)
    assert [len(first[s]) for s in ("train", "val", "test")] == [70, 20, 10]
    assert sorted(i for s in first.values() for i in s) == list(range(100))
    assert all(v == sorted(v) for v in first.values())
    assert split_documents(100, 0.2, 0.1, seed=1)["val"] != first["val"]
    with pytest.raises(ValueError, match="none for training"):
        split_documents(2, 0.2, 0.1, seed=0)


def test_blocks_start_with_bos_overlap_by_one_and_pad_the_last():
    tokenizer = ByteTokenizer()
    document = b"hello world"
    tokens, nbytes = document_blocks(tokenizer.encode(document), context=4, lengths=tokenizer.lengths)
    ids = [b + 2 for b in document]
    assert tokens.dtype == np.int32 and nbytes.dtype == np.int32
    assert tokens.tolist() == [
        [BOS_ID, *ids[0:4]],
        ids[3:8],
        [*ids[7:11], PAD_ID, PAD_ID][:5],
    ]
    assert nbytes.tolist() == [4, 4, 3] and nbytes.sum() == len(document)
    targets = tokens[:, 1:].reshape(-1)
    assert tokenizer.decode(targets[targets != PAD_ID].tolist()) == document
    assert document_blocks([], 4, tokenizer.lengths)[0].shape == (0, 5)  # an empty document has nothing to predict


def test_blocks_count_raw_bytes_of_bpe_targets(bpe, stdlib_docs):
    document = stdlib_docs[30]
    tokens, nbytes = document_blocks(bpe.encode(document), context=16, lengths=bpe.lengths)
    assert int(nbytes.sum()) == len(document)
    assert tokens[:, 0].tolist().count(BOS_ID) == 1 and (tokens[:-1] != PAD_ID).all()


def test_byte_tokenizer_round_trips_every_byte():
    tokenizer = ByteTokenizer()
    data = bytes(range(256)) * 2
    ids = tokenizer.encode(data)
    assert min(ids) == 2 and max(ids) == 257 and tokenizer.vocab_size == 258
    assert tokenizer.decode(ids) == data and tokenizer.encode("é") == [0xC3 + 2, 0xA9 + 2]
    assert tokenizer.token_bytes([PAD_ID, BOS_ID, 5]) == [0, 0, 1]
    assert isinstance(tokenizer_from_bytes(tokenizer.spec), ByteTokenizer)


def test_bpe_round_trips_arbitrary_source_bytes(bpe, stdlib_docs):
    rng = random.Random(0)
    samples = [*stdlib_docs[20:], b"x = '<|bos|>' + '<|pad|>'\n", b"caf\xc3\xa9 \xff\xfe\x80 tail", rng.randbytes(500)]
    reloaded = tokenizer_from_bytes(bpe.spec)
    for sample in samples:
        ids = bpe.encode(sample)
        assert bpe.decode(ids) == sample
        assert PAD_ID not in ids and BOS_ID not in ids  # text that spells a special token stays text
        assert sum(bpe.token_bytes(ids)) == len(sample)
        assert reloaded.encode(sample) == ids
    assert bpe.encode_many(samples) == [bpe.encode(s) for s in samples]
    assert bpe.vocab_size == 400 and bpe.token_bytes([PAD_ID, BOS_ID]) == [0, 0]
    held_out = stdlib_docs[20:]  # 142 merges learnt on other files still shorten code by a third
    assert sum(map(len, bpe.encode_many(held_out))) < 0.7 * sum(map(len, held_out))


def test_compression_baselines_are_sane(stdlib_docs):
    noise = np.random.default_rng(0).bytes(200_000)
    random_bits = compression_bits_per_byte([noise[:100_000], noise[100_000:]])
    assert 7.95 < random_bits["gzip"] < 8.1 and 7.95 < random_bits["xz"] < 8.1
    repetitive = compression_bits_per_byte([b"def f(x):\n    return x\n" * 2000])
    assert repetitive["gzip"] < 0.2 and repetitive["xz"] < 0.1
    code = compression_bits_per_byte(iter(stdlib_docs))
    assert 1.0 < code["xz"] < code["gzip"] < 3.5


def test_text_info_names_its_folders_and_old_tabular_info_still_loads():
    text = DatasetInfo(url="file:///d", kind="text", feature_columns=["tokens"], label_column="", input_shape=[8],
                       num_classes=300, num_train=1, num_val=1, num_test=1, digest="x")
    assert (text.train_url, text.test_url, text.tokenizer_url) == ("file:///d/train", "file:///d/test",
                                                                   "file:///d/tokenizer.json")
    old = DatasetInfo(url="file:///t", feature_columns=["a"], label_column="y", input_shape=[1], num_classes=2,
                      num_train=3, num_val=1, digest="y")
    assert (old.kind, old.train_url, old.num_test, old.baselines) == ("tabular", "file:///t/train.parquet", 0, {})
