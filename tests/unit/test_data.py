"""Driver-side datasets: a source becomes a deterministic, disjoint, stratified train/val/test split on the
storage root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import DataConfig
from orchestrator.training.data import SPLITS, load_split, prepare_dataset, split_rows

DIGITS_ROWS = 1797


def _local(url: str) -> Path:
    return Path(url.removeprefix("file://"))


def _rows(features: np.ndarray) -> set:
    return {row.tobytes() for row in features}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits-root").as_uri()
    return prepare_dataset(DataConfig(source="digits", input_shape=[1, 8, 8]), root)


def test_prepare_digits_writes_split_and_info(digits):
    folder = _local(digits.url)
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "test.parquet", "train.parquet", "val.parquet"]
    assert json.loads((folder / "info.json").read_text())["digest"] == digits.digest
    assert (digits.num_train, digits.num_val, digits.num_test) == (1258, 359, 180)  # 70/20/10 of 1,797 rows
    assert (digits.num_classes, digits.input_shape, digits.num_features) == (10, [1, 8, 8], 64)


def test_loaded_splits_match_info_and_are_disjoint(digits):
    splits = {split: load_split(digits, split) for split in SPLITS}
    sizes = {"train": digits.num_train, "val": digits.num_val, "test": digits.num_test}
    for split, (x, y) in splits.items():
        assert x.shape == (sizes[split], 64) and len(y) == sizes[split]
        assert (x.dtype, y.dtype) == (np.float32, np.int64)
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert set(np.unique(y)) == set(range(10))  # stratified: every class in every split
    rows = {split: _rows(x) for split, (x, _) in splits.items()}
    # digits has no duplicate images, so a shared row is a leak
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    assert len(rows["train"] | rows["val"] | rows["test"]) == DIGITS_ROWS


def test_held_out_splits_keep_each_class_share(digits):
    y_all = np.concatenate([load_split(digits, split)[1] for split in SPLITS])
    share = np.bincount(y_all) / len(y_all)
    for split in ("val", "test"):
        y = load_split(digits, split)[1]
        assert np.abs(np.bincount(y, minlength=10) / len(y) - share).max() < 0.01  # a random split strays ~3 points


def test_split_rows_is_seeded_disjoint_and_sized_exactly():
    labels = np.repeat(np.arange(3), [50, 30, 20])  # unbalanced classes
    first = split_rows(labels, 0.2, 0.1, seed=7)
    assert {k: len(v) for k, v in first.items()} == {"test": 10, "val": 20, "train": 70}
    assert sorted(np.concatenate(list(first.values())).tolist()) == list(range(100))
    assert {k: np.bincount(labels[v]).tolist() for k, v in first.items()} == {
        "test": [5, 3, 2], "val": [10, 6, 4], "train": [35, 21, 14]}
    again = split_rows(labels, 0.2, 0.1, seed=7)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    other = split_rows(labels, 0.2, 0.1, seed=8)
    assert not np.array_equal(first["test"], other["test"])


def test_a_class_too_small_to_share_stays_in_train():
    labels = np.array([0] * 40 + [1])  # one row of class 1
    splits = split_rows(labels, 0.2, 0.1, seed=0)
    assert 40 in splits["train"]


def test_fractions_that_leave_no_training_row_raise_naming_the_fields():
    with pytest.raises(ValueError, match=r"data\.val_fraction 0.5 and data\.test_fraction 0.4 leave no training"):
        split_rows(np.zeros(3, dtype=np.int64), 0.5, 0.4, seed=0)


def test_test_fraction_changes_the_digest_and_the_split(digits, tmp_path):
    wider = prepare_dataset(DataConfig(source="digits", input_shape=[1, 8, 8], test_fraction=0.2), tmp_path.as_uri())
    assert wider.digest != digits.digest and wider.num_test == round(DIGITS_ROWS * 0.2)


def test_split_is_deterministic_and_follows_split_seed(digits, tmp_path):
    # A fresh root so the split is recomputed rather than read back from the first call's files.
    again = prepare_dataset(DataConfig(source="digits", input_shape=[1, 8, 8]), (tmp_path / "a").as_uri())
    assert again.digest == digits.digest
    x_first, y_first = load_split(digits, "val")
    x_again, y_again = load_split(again, "val")
    assert np.array_equal(y_first, y_again) and np.array_equal(x_first, x_again)

    other = prepare_dataset(DataConfig(source="digits", input_shape=[1, 8, 8], split_seed=1), (tmp_path / "b").as_uri())
    assert other.digest != digits.digest
    assert _rows(load_split(other, "val")[0]) != _rows(x_first)


def test_cached_dataset_takes_this_calls_input_shape(digits):
    root = _local(digits.url).parents[1].as_uri()  # the same storage root: the files are reused
    flat = prepare_dataset(DataConfig(source="digits", input_shape=[64]), root)
    assert flat.url == digits.url
    assert flat.input_shape == [64]


def test_synthetic_source(tmp_path):
    cfg = DataConfig(
        source="synthetic", synthetic_samples=200, synthetic_features=5, synthetic_classes=3, val_fraction=0.25
    )
    info = prepare_dataset(cfg, tmp_path.as_uri())
    x_val, y_val = load_split(info, "val")

    assert (info.num_train, info.num_val, info.num_test, info.num_classes, info.input_shape) == (130, 50, 20, 3, [5])
    assert x_val.shape == (50, 5) and set(np.unique(y_val)) <= {0, 1, 2}


def _assert_pairs_kept(info, features: np.ndarray, labels: np.ndarray) -> None:
    """Every loaded row is a source row carrying its own label, and every source row appears once."""
    label_of = {row.tobytes(): label for row, label in zip(features, labels)}
    seen = []
    for split in SPLITS:
        x, y = load_split(info, split)
        seen += [row.tobytes() for row in x]
        assert [label_of[row.tobytes()] for row in x] == y.tolist()
    assert sorted(seen) == sorted(label_of)


def _features(rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(rows, cols)).astype(np.float32)


def test_user_parquet_with_named_feature_and_label_columns(tmp_path):
    x, y = _features(60, 3), np.arange(60) % 4
    source = tmp_path / "user.parquet"
    pq.write_table(
        pa.table({"row_id": np.arange(60), "sepal": x[:, 0], "petal": x[:, 1], "stem": x[:, 2], "kind": y}), source
    )

    cfg = DataConfig(source=source.as_uri(), feature_columns=["sepal", "petal", "stem"], label_column="kind")
    info = prepare_dataset(cfg, (tmp_path / "root").as_uri())

    assert (info.feature_columns, info.label_column, info.num_classes, info.input_shape) == (
        ["sepal", "petal", "stem"],
        "kind",
        4,
        [3],
    )
    assert info.num_train + info.num_val + info.num_test == 60
    _assert_pairs_kept(info, x, y)


def test_user_parquet_uses_every_other_column_when_feature_columns_is_empty(tmp_path):
    x, y = _features(40, 2), np.arange(40) % 2
    source = tmp_path / "user.parquet"
    pq.write_table(pa.table({"a": x[:, 0], "y": y, "b": x[:, 1]}), source)

    info = prepare_dataset(DataConfig(source=source.as_uri(), label_column="y"), (tmp_path / "root").as_uri())
    assert info.feature_columns == ["a", "b"]
    _assert_pairs_kept(info, x, y)


def test_user_parquet_with_one_list_typed_feature_column(tmp_path):
    x, y = _features(50, 6), np.arange(50) % 5
    source = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"pixels": pa.array(list(x), type=pa.list_(pa.float32())), "digit": y}), source)

    cfg = DataConfig(source=source.as_uri(), feature_columns=["pixels"], label_column="digit", input_shape=[1, 2, 3])
    info = prepare_dataset(cfg, (tmp_path / "root").as_uri())

    assert info.feature_columns == [f"pixels_{i}" for i in range(6)]
    assert (info.num_features, info.input_shape, info.num_classes) == (6, [1, 2, 3], 5)
    _assert_pairs_kept(info, x, y)


def test_missing_label_column_raises_naming_the_field(tmp_path):
    source = tmp_path / "user.parquet"
    pq.write_table(pa.table({"a": [0.0, 1.0], "target": [0, 1]}), source)
    with pytest.raises(ValueError, match=r"data\.label_column"):
        prepare_dataset(DataConfig(source=source.as_uri()), tmp_path.as_uri())


def test_missing_feature_column_raises_naming_the_field(tmp_path):
    source = tmp_path / "user.parquet"
    pq.write_table(pa.table({"a": [0.0, 1.0], "label": [0, 1]}), source)
    with pytest.raises(ValueError, match=r"data\.feature_columns"):
        prepare_dataset(DataConfig(source=source.as_uri(), feature_columns=["a", "zzz"]), tmp_path.as_uri())


def test_missing_source_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.parquet"):
        prepare_dataset(DataConfig(source=(tmp_path / "nothing.parquet").as_uri()), tmp_path.as_uri())


def test_input_shape_that_does_not_hold_the_features_raises(tmp_path):
    with pytest.raises(ValueError, match=r"data\.input_shape"):
        prepare_dataset(DataConfig(source="digits", input_shape=[1, 7, 7]), tmp_path.as_uri())
    assert not (tmp_path / "datasets").exists()  # nothing half-written
