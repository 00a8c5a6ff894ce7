"""Datasets: a tabular source (digits | synthetic | Parquet URL) becomes a deterministic train/val/test
split (seeded, stratified by label) written as Parquet under the storage root; a text source becomes
train/val/test token blocks (orchestrator.training.text); a labelled text source becomes rows of token ids
split like tabular data (orchestrator.training.labeled_text). Workers read them through Ray Data shards.

Selection (best epoch, best trial, a fine-tune's best epoch) reads val; test is read once per registered
version, for the manifest, promotion and the compression gate.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from orchestrator.config import DataConfig, DataKind
from orchestrator.progress import Progress, say
from orchestrator.registry import storage

SPLITS = ("train", "val", "test")
TRAINING_SPLITS = ("train", "val")
"""What training and selection read; test is only read to score a chosen checkpoint."""


@dataclass(frozen=True, kw_only=True)
class DatasetInfo:
    """Where a prepared dataset lives and what it holds."""

    url: str
    """Folder holding the splits (tabular and labeled_text: train.parquet, val.parquet, test.parquet; text:
    train/, val/, test/ folders; text and labeled_text: tokenizer.json) and info.json."""
    feature_columns: List[str]
    label_column: str
    input_shape: List[int]
    """Shape of one sample as the model sees it (text and labeled_text: [context])."""
    num_classes: int
    """Classes (text: the vocabulary size, the width of a language model's head)."""
    num_train: int
    """Rows of the train split (text: token blocks)."""
    num_val: int
    digest: str
    """sha256 of the data and split parameters (the data's identity in lineage)."""
    kind: str = "tabular"
    """'tabular', 'text' or 'labeled_text'."""
    num_test: int = 0
    """Rows of the test split (text: token blocks); 0 in datasets prepared before tabular data had one."""
    context: int = 0
    """text: tokens a model sees per block; each row holds context + 1 tokens. labeled_text: ids per row."""
    vocab_size: int = 0
    """text: ids of the tokenizer (<|pad|> = 0 and <|bos|> = 1 included); labeled_text: the HF tokenizer's."""
    tokenizer: str = ""
    """text: 'bpe' or 'bytes'; labeled_text: 'hf'. The tokenizer itself is at `tokenizer_url`."""
    class_names: List[str] = field(default_factory=list)
    """labeled_text: the name of each class, indexed by label (e.g. ['ham', 'spam'])."""
    split_bytes: Dict[str, int] = field(default_factory=dict)
    """text: raw bytes of each split's documents, as written (train counts every repeat)."""
    split_tokens: Dict[str, int] = field(default_factory=dict)
    """text: target tokens of each split (every token after a document's BOS, pads excluded)."""
    files: Dict[str, int] = field(default_factory=dict)
    """text: documents of each split, as written (train counts every repeat)."""
    baselines: Dict[str, float] = field(default_factory=dict)
    """text: compression of the same text in bits per byte, e.g. 'test_gzip_bits_per_byte' (gzip -9),
    'test_xz_bits_per_byte' (xz -9e), and the same for 'val_'."""

    @property
    def train_url(self) -> str:
        return self.split_url("train")

    @property
    def val_url(self) -> str:
        return self.split_url("val")

    @property
    def test_url(self) -> str:
        return self.split_url("test")

    @property
    def tokenizer_url(self) -> str:
        return storage.join(self.url, "tokenizer.json")

    def split_url(self, split: str) -> str:
        """A split's Parquet: a file for tabular and labelled text, a folder of files for text."""
        return storage.join(self.url, split if self.kind == DataKind.text else f"{split}.parquet")

    @property
    def num_features(self) -> int:
        return int(np.prod(self.input_shape))


def prepare_dataset(cfg: DataConfig, root: str) -> DatasetInfo:
    """Load `cfg.source`, split it, and write it under `<root>/datasets/` (once per digest).

    Text (`cfg.kind == 'text'`) is tokenized in Ray Data (orchestrator.training.text.prepare_text); labelled
    text on the driver (orchestrator.training.labeled_text.prepare_labeled_text).
    """
    if cfg.kind == DataKind.text:
        from orchestrator.training.text import prepare_text

        return prepare_text(cfg, root)
    if cfg.kind == DataKind.labeled_text:
        from orchestrator.training.labeled_text import prepare_labeled_text

        return prepare_labeled_text(cfg, root)
    features, labels, columns, label_column = _load_source(cfg)
    input_shape = list(cfg.input_shape) or natural_shape(cfg.source, features.shape[1])
    if int(np.prod(input_shape)) != features.shape[1]:
        raise ValueError(
            f"data.input_shape {input_shape} holds {int(np.prod(input_shape))} values "
            f"but the source has {features.shape[1]} features"
        )
    digest = _digest(features, labels, cfg)
    url = storage.join(root, "datasets", f"{_source_name(cfg.source)}-{digest[:12]}")
    earlier = prepared_earlier(url)
    if earlier is not None:
        # The files do not depend on input_shape (only on how a model views a row): honour this call's.
        return replace(earlier, input_shape=input_shape)
    splits = split_rows(labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    info = DatasetInfo(
        url=url, feature_columns=columns, label_column=label_column, input_shape=input_shape,
        num_classes=int(labels.max()) + 1, num_train=len(splits["train"]), num_val=len(splits["val"]),
        num_test=len(splits["test"]), digest=digest,
    )
    written = Progress(f"data: writing {_source_name(cfg.source)}", len(splits), "splits")
    for split, rows in splits.items():
        _write_parquet(info.split_url(split), features[rows], labels[rows], columns, label_column)
        written.advance()
    mark_prepared(info)
    written.done(f"{split_sizes(info)} in {info.url}")
    return info


def prepared_earlier(url: str) -> Optional[DatasetInfo]:
    """The dataset an earlier call prepared in folder `url` (its info.json, written last, says it is complete),
    or None."""
    info_url = storage.join(url, "info.json")
    if not storage.exists(info_url):
        return None
    info = DatasetInfo(**json.loads(storage.read_bytes(info_url)))
    say(f"data: {info.url} ({split_sizes(info)}), prepared earlier")
    return info


def mark_prepared(info: DatasetInfo) -> None:
    """Write `info` as the dataset folder's info.json: last, once every split is written, so it marks the
    folder complete."""
    storage.write_bytes_atomic(storage.join(info.url, "info.json"), json.dumps(asdict(info), indent=2).encode())


def split_sizes(info: DatasetInfo) -> str:
    """'train 1258, val 359, test 180 rows' (tabular and labeled_text; text: token blocks), for progress lines."""
    unit = "blocks" if info.kind == DataKind.text else "rows"
    return f"train {info.num_train}, val {info.num_val}, test {info.num_test} {unit}"


def load_split(info: DatasetInfo, split: str) -> Tuple[np.ndarray, np.ndarray]:
    """Read a split ('train', 'val' or 'test') into memory on the driver: (features float32 [N, F], labels
    int64 [N]). Tabular and labelled text (F = context token ids) only."""
    import pyarrow.parquet as pq

    if info.kind == DataKind.text:
        raise ValueError("load_split reads tabular data; text splits are streamed (ray_datasets)")
    _check_split(info, split)
    fs, path = storage.filesystem(info.split_url(split))
    with fs.open(path, "rb") as f:
        table = pq.read_table(f)
    return _table_to_arrays(table, info.feature_columns, info.label_column)


def ray_datasets(info: DatasetInfo, splits: Sequence[str] = TRAINING_SPLITS) -> Dict[str, Any]:
    """Ray Data datasets of a prepared dataset's `splits`; by default the splits training reads (its workers
    never hold the test split).

    Tabular: batches {'x': float32 [B, F], 'y': int64 [B]}, materialized once into the object store:
    every epoch of every trial then streams blocks from shared memory instead of re-reading Parquet (a
    re-read costs seconds per epoch here).
    Text: {'tokens': int32 [B, context + 1], 'nbytes': int32 [B]}, read lazily from Parquet so workers
    stream them and nothing holds a split whole.
    """
    import ray.data

    configure_ray_data()
    if info.kind == DataKind.text:
        from orchestrator.training.text import split_files

        fs, _ = storage.pyarrow_filesystem(info.url)
        return {split: ray.data.read_parquet(split_files(info.split_url(split)), filesystem=fs) for split in splits}
    columns, label = info.feature_columns, info.label_column

    def to_xy(batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
        return {"x": _stack(batch, columns), "y": batch[label].astype(np.int64)}

    out = {}
    for split in splits:
        _check_split(info, split)
        fs, path = storage.pyarrow_filesystem(info.split_url(split))
        out[split] = ray.data.read_parquet(path, filesystem=fs).map_batches(to_xy, batch_format="numpy").materialize()
    return out


def _check_split(info: DatasetInfo, split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if split == "test" and not info.num_test:  # tabular data prepared before it had a test split
        raise ValueError(f"{info.url} has no test split: prepare the dataset again (a new storage root)")


def configure_ray_data() -> None:
    """Ray Data settings every dataset here relies on (this process's DataContext)."""
    import ray.data

    context = ray.data.DataContext.get_current()
    # (Its progress bars are orchestrator.runtime's: on only with verbose=true.)
    # Rows keep their Parquet order, so every worker that reads a split sees the same sequence and
    # its share of it (orchestrator.training.loop) is the same from run to run.
    context.execution_options.preserve_order = True
    # Ray 2.60's DataSourceV2 read path lists files in a task that idles about 5 s per read (measured here:
    # 4.5-6.5 s for one 1,438-row file, 48 ms of it CPU); the V1 path reads the same file in 0.1-0.7 s.
    context.use_datasource_v2 = False


def natural_shape(source: str, num_features: int) -> List[int]:
    """A sample's shape when data.input_shape is empty: digits are 1x8x8 images, other sources flat rows."""
    return [1, 8, 8] if source == "digits" else [num_features]


def _load_source(cfg: DataConfig) -> Tuple[np.ndarray, np.ndarray, List[str], str]:
    if cfg.source == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        features = (digits.data / 16.0).astype(np.float32)  # pixel intensities 0..16 -> 0..1
        return features, digits.target.astype(np.int64), [f"pixel_{i}" for i in range(features.shape[1])], "label"
    if cfg.source == "synthetic":
        return _synthetic(cfg)
    return _read_parquet_source(cfg)


def _synthetic(cfg: DataConfig):
    rng = np.random.default_rng(cfg.split_seed)
    centers = rng.normal(scale=1.5, size=(cfg.synthetic_classes, cfg.synthetic_features))
    labels = rng.integers(0, cfg.synthetic_classes, size=cfg.synthetic_samples)
    features = centers[labels] + rng.normal(size=(cfg.synthetic_samples, cfg.synthetic_features))
    return (
        features.astype(np.float32),
        labels.astype(np.int64),
        [f"f{i}" for i in range(cfg.synthetic_features)],
        "label",
    )


def _read_parquet_source(cfg: DataConfig):
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(cfg.source)
    if not fs.exists(path):
        raise FileNotFoundError(f"data.source {cfg.source!r} does not exist")
    table = pq.read_table(path, filesystem=fs)
    if cfg.label_column not in table.column_names:
        raise ValueError(
            f"data.label_column {cfg.label_column!r} is not a column of {cfg.source} (columns: {table.column_names})"
        )
    columns = list(cfg.feature_columns) or [c for c in table.column_names if c != cfg.label_column]
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise ValueError(f"data.feature_columns {missing} are not columns of {cfg.source}")
    features, labels = _table_to_arrays(table, columns, cfg.label_column)
    if len(columns) == 1 and features.shape[1] > 1:  # one list-typed column: spread it out
        columns = [f"{columns[0]}_{i}" for i in range(features.shape[1])]
    if labels.min() < 0:
        raise ValueError(f"data.label_column {cfg.label_column!r} must hold class indices >= 0")
    return features, labels, columns, cfg.label_column


def _table_to_arrays(table, columns: List[str], label: str) -> Tuple[np.ndarray, np.ndarray]:
    batch = {c: table.column(c).to_numpy(zero_copy_only=False) for c in columns}
    return _stack(batch, columns), table.column(label).to_numpy().astype(np.int64)


def _stack(batch: Dict[str, np.ndarray], columns: List[str]) -> np.ndarray:
    if len(columns) == 1 and batch[columns[0]].dtype == object:
        return np.stack([np.asarray(v, dtype=np.float32) for v in batch[columns[0]]])
    return np.stack([batch[c] for c in columns], axis=1).astype(np.float32)


def split_rows(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> Dict[str, np.ndarray]:
    """Row indices of each split {'train', 'val', 'test'}, each sorted; seeded, disjoint, covering every row.

    Stratified by label: each class's rows, in a seeded order, are spread evenly over [0, 1) (the i-th of
    n at (i + 0.5) / n); test takes the lowest positions, val the next, train the rest. Every split then
    holds each class in about its share of the data, with exact split sizes, and a class of one or two
    rows lands in train before any held-out split. Raises ValueError when no training row is left.
    """
    n = len(labels)
    order = stratified_order(labels, np.random.default_rng(seed))
    n_test, n_val = (max(1, int(round(n * f))) for f in (test_fraction, val_fraction))
    if n - n_test - n_val < 1:
        raise ValueError(f"data.val_fraction {val_fraction} and data.test_fraction {test_fraction} leave no "
                         f"training rows out of {n}")
    held = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {split: np.sort(rows) for split, rows in held.items()}


def stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """All row indices in a seeded order where every prefix holds each class in about its share of the rows
    (`split_rows`; the first k of it are a stratified sample of k rows)."""
    n = len(labels)
    shuffled = rng.permutation(n)
    position = np.empty(n)
    for label in np.unique(labels):
        members = shuffled[labels[shuffled] == label]
        position[members] = (np.arange(len(members)) + 0.5) / len(members)
    return np.lexsort((rng.permutation(n), position))  # ties (equal class sizes) broken at random


def _write_parquet(url: str, features: np.ndarray, labels: np.ndarray, columns: List[str], label: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({**{c: features[:, i] for i, c in enumerate(columns)}, label: labels})
    fs, path = storage.filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def _digest(features: np.ndarray, labels: np.ndarray, cfg: DataConfig) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(features).tobytes())
    h.update(np.ascontiguousarray(labels).tobytes())
    h.update(f"stratified:{cfg.val_fraction}:{cfg.test_fraction}:{cfg.split_seed}".encode())
    return h.hexdigest()


def _source_name(source: str) -> str:
    name = source.rstrip("/").rsplit("/", 1)[-1].removesuffix(".parquet")
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "data"
