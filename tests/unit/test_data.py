"""Driver-side datasets: a source becomes a deterministic, disjoint train/val split on the storage root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.config import DataConfig
from orchestrator.training.data import load_split, prepare_dataset

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
    assert sorted(p.name for p in folder.iterdir()) == ["info.json", "train.parquet", "val.parquet"]
    assert json.loads((folder / "info.json").read_text())["digest"] == digits.digest
    assert digits.num_train + digits.num_val == DIGITS_ROWS
    assert digits.num_val == round(DIGITS_ROWS * 0.2)
    assert (digits.num_classes, digits.input_shape, digits.num_features) == (10, [1, 8, 8], 64)


def test_loaded_splits_match_info_and_are_disjoint(digits):
    x_train, y_train = load_split(digits, "train")
    x_val, y_val = load_split(digits, "val")

    assert x_train.shape == (digits.num_train, 64) and x_val.shape == (digits.num_val, 64)
    assert (x_train.dtype, y_train.dtype) == (np.float32, np.int64)
    assert len(y_train) == digits.num_train and len(y_val) == digits.num_val
    assert not _rows(x_train) & _rows(x_val)  # digits has no duplicate images, so a shared row is a leak
    assert len(_rows(x_train) | _rows(x_val)) == DIGITS_ROWS
    assert x_train.min() >= 0.0 and x_train.max() <= 1.0 and x_val.max() <= 1.0
    assert set(np.unique(y_train)) == set(range(10))


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

    assert (info.num_train, info.num_val, info.num_classes, info.input_shape) == (150, 50, 3, [5])
    assert x_val.shape == (50, 5) and set(np.unique(y_val)) <= {0, 1, 2}


def _assert_pairs_kept(info, features: np.ndarray, labels: np.ndarray) -> None:
    """Every loaded row is a source row carrying its own label, and every source row appears once."""
    label_of = {row.tobytes(): label for row, label in zip(features, labels)}
    seen = []
    for split in ("train", "val"):
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
    assert info.num_train + info.num_val == 60
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
