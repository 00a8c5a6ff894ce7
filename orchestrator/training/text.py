"""Text datasets: documents (this interpreter's standard library source, files through fsspec, or a Parquet
text column) split by document into train/val/test, tokenized in Ray Data into fixed-length token blocks
and written as Parquet under the storage root.

The driver only lists documents and streams them one at a time (for the digest, BPE training and the
compression baselines); Ray Data tasks read and tokenize them, so no process holds a split whole.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import json
import lzma
import math
import re
import sysconfig
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from orchestrator.config import DataConfig, TokenizerKind
from orchestrator.progress import counted, polled
from orchestrator.registry import storage
from orchestrator.training.data import (
    SPLITS,
    DatasetInfo,
    configure_ray_data,
    mark_prepared,
    prepared_earlier,
)

PAD_ID = 0
"""Pads the last block of a document; a target equal to it is ignored by the loss."""
BOS_ID = 1
"""Starts every document."""
SPECIAL_TOKENS = ("<|pad|>", "<|bos|>")
TOKENS_COLUMN = "tokens"
NBYTES_COLUMN = "nbytes"
TEST_DIRS = frozenset({"test", "tests", "idle_test"})
"""Folders of the standard library that hold its own tests (left out of the corpus), besides `test_*`."""
DOCUMENTS_PER_TASK = 64
"""Documents one Ray Data task tokenizes (one Parquet file per task): 12 files per split of the stdlib corpus."""


# ---------------------------------------------------------------------------------------------- tokenizers


class TextTokenizer:
    """Token ids <-> raw bytes. Id 0 is <|pad|>, id 1 <|bos|>; every other id stands for one or more bytes."""

    pad_id = PAD_ID
    bos_id = BOS_ID

    def __init__(self, pieces: Sequence[bytes], spec: bytes) -> None:
        self._pieces = list(pieces)
        self.lengths = np.array([len(p) for p in pieces], dtype=np.int32)
        """Bytes each id stands for (0 for the special tokens), indexed by id."""
        self.spec = spec
        """The tokenizer.json that rebuilds this tokenizer (`tokenizer_from_bytes`)."""

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def encode(self, text: Union[str, bytes]) -> List[int]:
        """Ids of `text` (a str is taken as UTF-8), without BOS: `decode(encode(x)) == x` for any bytes."""
        raise NotImplementedError

    def encode_many(self, documents: Sequence[bytes]) -> List[List[int]]:
        """`encode` of each document (a tokenizer may encode them together, faster)."""
        return [self.encode(d) for d in documents]

    def decode(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._pieces[i] for i in ids)

    def token_bytes(self, ids: Iterable[int]) -> List[int]:
        """Raw bytes each id stands for (0 for <|pad|> and <|bos|>)."""
        return self.lengths[np.fromiter(ids, dtype=np.int64)].tolist()


class ByteTokenizer(TextTokenizer):
    """Raw bytes: byte b is id b + 2, after <|pad|> and <|bos|> (258 ids)."""

    def __init__(self) -> None:
        spec = {"kind": "bytes", "vocab_size": 258, "pad_id": PAD_ID, "bos_id": BOS_ID, "byte_offset": 2}
        super().__init__([b"", b""] + [bytes([b]) for b in range(256)], json.dumps(spec).encode())

    def encode(self, text: Union[str, bytes]) -> List[int]:
        data = text.encode() if isinstance(text, str) else text
        return (np.frombuffer(data, dtype=np.uint8).astype(np.int64) + 2).tolist()


class BpeTokenizer(TextTokenizer):
    """Byte-level BPE (the `tokenizers` library): every byte has an id, merges come from training."""

    def __init__(self, tokenizer: Any) -> None:
        # Text that spells "<|bos|>" is text, not the special token: only the loader puts BOS and PAD in.
        tokenizer.encode_special_tokens = True
        byte_of = {c: b for b, c in _byte_to_char().items()}
        tokens = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
        pieces = [b"" if t in SPECIAL_TOKENS else bytes(byte_of[c] for c in t) for t in tokens]
        super().__init__(pieces, tokenizer.to_str().encode())
        self._tokenizer = tokenizer
        self._byte_ids = {byte_of[c]: tokenizer.token_to_id(c) for c in byte_of}

    def encode(self, text: Union[str, bytes]) -> List[int]:
        if isinstance(text, str):
            return self._tokenizer.encode(text, add_special_tokens=False).ids
        decoded = _utf8_or_none(text)
        if decoded is not None:
            return self.encode(decoded)
        # `tokenizers` takes only valid UTF-8: runs of invalid bytes become their single-byte ids.
        ids: List[int] = []
        for i, part in enumerate(_INVALID_RUNS.split(text.decode("utf-8", "surrogateescape"))):
            if i % 2:
                ids.extend(self._byte_ids[b] for b in part.encode("utf-8", "surrogateescape"))
            elif part:
                ids.extend(self.encode(part))
        return ids

    def encode_many(self, documents: Sequence[bytes]) -> List[List[int]]:
        texts = [_utf8_or_none(d) for d in documents]
        valid = [t for t in texts if t is not None]
        # encode_batch_fast skips the offsets `encode` computes: about twice as fast here.
        batched = iter(self._tokenizer.encode_batch_fast(valid, add_special_tokens=False))
        return [self.encode(d) if t is None else next(batched).ids for d, t in zip(documents, texts)]


def _utf8_or_none(data: bytes) -> Optional[str]:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


_INVALID_RUNS = re.compile("([\udc80-\udcff]+)")  # bytes that surrogateescape could not decode


@functools.lru_cache(maxsize=1)
def _byte_to_char() -> Dict[int, str]:
    """GPT-2's byte -> printable character map, which `tokenizers`' ByteLevel pre-tokenizer uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return chars


def train_bpe(documents: Iterable[bytes], vocab_size: int, count: Optional[int] = None) -> BpeTokenizer:
    """A byte-level BPE of `vocab_size` ids (<|pad|> = 0, <|bos|> = 1) trained on `documents`, streamed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    texts = (d.decode("utf-8", errors="replace") for d in documents)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=count)
    return BpeTokenizer(tokenizer)


def tokenizer_from_bytes(data: bytes) -> TextTokenizer:
    """The tokenizer a tokenizer.json holds (as `TextTokenizer.spec` wrote it)."""
    spec = json.loads(data)
    if spec.get("kind") == "bytes":
        return ByteTokenizer()
    from tokenizers import Tokenizer

    return BpeTokenizer(Tokenizer.from_str(data.decode()))


def load_tokenizer(url: str) -> TextTokenizer:
    """The tokenizer saved at `url` (a dataset's `tokenizer_url`, or a registry version's copy)."""
    return tokenizer_from_bytes(storage.read_bytes(url))


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(spec: bytes) -> TextTokenizer:
    return tokenizer_from_bytes(spec)  # once per Ray worker process, not once per batch


# ----------------------------------------------------------------------------------------------- documents


@dataclass(frozen=True)
class DocumentRef:
    """Where one document lives: a whole file, or one row of a Parquet file's text column."""

    url: str
    row_group: int = -1
    """Parquet: the row group holding the document; -1 for a whole file."""
    row: int = 0
    """Parquet: the row inside that row group."""


def list_documents(cfg: DataConfig) -> List[DocumentRef]:
    """The documents of `cfg.source` in their fixed order, the first `cfg.max_files` of them (0: all)."""
    if cfg.source == "stdlib":
        refs = [DocumentRef(u) for u in list_files(sysconfig.get_paths()["stdlib"], cfg.file_pattern, True)]
    elif _is_parquet_table(cfg.source):
        refs = _parquet_documents(cfg.source)
    else:
        refs = [DocumentRef(u) for u in list_files(cfg.source, cfg.file_pattern, False)]
    if not refs:
        raise ValueError(f"data.source {cfg.source!r} holds no documents (data.file_pattern {cfg.file_pattern!r})")
    return refs[: cfg.max_files] if cfg.max_files else refs


def list_files(source: str, pattern: str, skip_tests: bool) -> List[str]:
    """URLs of the files of a folder matching `pattern` (sorted by relative path), of a glob, or one file.

    `skip_tests` leaves out site-packages and test code: any folder or file named test, tests, idle_test or test_*.
    """
    fs, path = storage.filesystem(source)
    if any(c in path for c in "*?["):
        return [fs.unstrip_protocol(p) for p in sorted(fs.glob(path)) if fs.isfile(p)]
    if not fs.exists(path):
        raise FileNotFoundError(f"data.source {source!r} does not exist")
    if not fs.isdir(path):
        return [fs.unstrip_protocol(path)]
    root = path.rstrip("/") + "/"
    relative: List[str] = []
    for folder, dirs, files in fs.walk(path, topdown=True):
        if skip_tests:  # pruned in place: the walk does not enter them (site-packages alone holds thousands)
            dirs[:] = [d for d in dirs if not _is_test_or_vendored(d)]
            files = [f for f in files if not _is_test_or_vendored(f)]
        prefix = folder.rstrip("/")[len(root):]
        relative.extend(f"{prefix}/{f}" if prefix else f for f in files if fnmatch.fnmatch(f, pattern))
    return [fs.unstrip_protocol(root + r) for r in sorted(relative)]


def _is_test_or_vendored(name: str) -> bool:
    return name in TEST_DIRS or name.startswith("test_") or name == "site-packages"


def _is_parquet_table(source: str) -> bool:
    fs, path = storage.filesystem(source)
    if path.rstrip("/").endswith(".parquet"):
        return True
    if not fs.isdir(path):
        return False
    names = [p.rsplit("/", 1)[-1] for p in fs.find(path)]
    data = [n for n in names if not n.startswith(("_", "."))]
    return bool(data) and all(n.endswith(".parquet") for n in data)


def _parquet_documents(source: str) -> List[DocumentRef]:
    """One ref per row of a Parquet file or folder of them (reads the footers only)."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(source)
    if any(c in path for c in "*?["):
        files = sorted(fs.glob(path))
    elif fs.isdir(path):
        files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    else:
        files = [path]
    refs: List[DocumentRef] = []
    for file in files:
        with fs.open(file, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        url = fs.unstrip_protocol(file)
        for group in range(meta.num_row_groups):
            refs.extend(DocumentRef(url, group, row) for row in range(meta.row_group(group).num_rows))
    return refs


def read_documents(refs: Sequence[DocumentRef], text_column: str) -> Iterator[bytes]:
    """The documents' bytes, one at a time (a Parquet row group is read once for its consecutive rows)."""
    group: Tuple[str, int] = ("", -1)
    texts: List[bytes] = []
    for ref in refs:
        if ref.row_group < 0:
            yield storage.read_bytes(ref.url)
            continue
        if (ref.url, ref.row_group) != group:
            group, texts = (ref.url, ref.row_group), _read_row_group(ref.url, ref.row_group, text_column)
        yield texts[ref.row]


def _read_row_group(url: str, row_group: int, text_column: str) -> List[bytes]:
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        parquet = pq.ParquetFile(f)
        if text_column not in parquet.schema_arrow.names:
            raise ValueError(
                f"data.text_column {text_column!r} is not a column of {url} (columns: {parquet.schema_arrow.names})"
            )
        values = parquet.read_row_group(row_group, columns=[text_column]).column(0).to_pylist()
    return [b"" if v is None else v.encode() if isinstance(v, str) else bytes(v) for v in values]


def split_documents(count: int, val_fraction: float, test_fraction: float, seed: int) -> Dict[str, List[int]]:
    """Document indices of each split {'train', 'val', 'test'}, each in corpus order; seeded, disjoint."""
    n_val, n_test = (max(1, int(round(count * f))) for f in (val_fraction, test_fraction))
    if count - n_val - n_test < 1:
        raise ValueError(f"{count} documents leave none for training after {n_val} val and {n_test} test documents")
    order = np.random.default_rng(seed).permutation(count)
    held = {"test": order[:n_test], "val": order[n_test:n_test + n_val], "train": order[n_test + n_val:]}
    return {split: sorted(int(i) for i in held[split]) for split in SPLITS}


def training_order(count: int, repeat: int, seed: int) -> List[int]:
    """Positions of the `count` train documents in the order they are written: `repeat` seeded permutations."""
    rng = np.random.default_rng(seed + 1)
    return [int(i) for _ in range(repeat) for i in rng.permutation(count)]


# ------------------------------------------------------------------------------------------------ blocking


def document_blocks(ids: Sequence[int], context: int, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """[BOS] + ids cut into rows of context + 1 tokens with stride `context`, the last padded with PAD.

    Consecutive rows overlap by one token, so every token after BOS is a target exactly once.
    Returns (tokens int32 [rows, context + 1], nbytes int32 [rows]: raw bytes of each row's targets tokens[1:]).
    """
    rows = math.ceil(len(ids) / context)
    padded = np.full(rows * context + 1, PAD_ID, dtype=np.int32)
    padded[0] = BOS_ID
    padded[1:len(ids) + 1] = ids
    tokens = padded[np.arange(rows)[:, None] * context + np.arange(context + 1)]
    return tokens, lengths[tokens[:, 1:]].sum(axis=1, dtype=np.int64).astype(np.int32)


def tokenize_batch(batch: Dict[str, np.ndarray], *, spec: bytes, context: int, text_column: str):
    """Ray Data map_batches: document refs in, token blocks out {'tokens': int32 [rows, context + 1], 'nbytes'}.

    A 2-D array becomes one tensor column (Ray's tensor type, a list column in Parquet), not a column per position.
    """
    tokenizer = _cached_tokenizer(spec)
    refs = [DocumentRef(str(u), int(g), int(r)) for u, g, r in zip(batch["url"], batch["row_group"], batch["row"])]
    ids = tokenizer.encode_many(list(read_documents(refs, text_column)))
    blocks = [document_blocks(i, context, tokenizer.lengths) for i in ids]
    return {
        TOKENS_COLUMN: np.concatenate([b[0] for b in blocks]) if blocks else np.zeros((0, context + 1), np.int32),
        NBYTES_COLUMN: np.concatenate([b[1] for b in blocks]) if blocks else np.zeros(0, np.int32),
    }


# ------------------------------------------------------------------------------------- compression baselines


def compression_bits_per_byte(documents: Iterable[bytes]) -> Dict[str, float]:
    """gzip -9 and xz -9e on the documents concatenated, streamed: {'gzip': bits per byte, 'xz': ...}."""
    gzip = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: the gzip container, as `gzip -9` writes
    xz = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=9 | lzma.PRESET_EXTREME)
    raw = gzip_size = xz_size = 0
    for document in documents:
        raw += len(document)
        gzip_size += len(gzip.compress(document))
        xz_size += len(xz.compress(document))
    gzip_size += len(gzip.flush())
    xz_size += len(xz.flush())
    return {"gzip": 8 * gzip_size / max(raw, 1), "xz": 8 * xz_size / max(raw, 1)}


# ------------------------------------------------------------------------------------------------- prepare


def prepare_text(cfg: DataConfig, root: str) -> DatasetInfo:
    """Split, tokenize (in Ray Data) and write `cfg.source` under `<root>/datasets/text-<digest>` (once per digest).

    Returns the dataset's info; a second call with the same documents and parameters returns the stored one.
    Raises FileNotFoundError for a missing source, ValueError for one without documents or too few to split.
    """
    refs = list_documents(cfg)
    splits = split_documents(len(refs), cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    # Every call reads the whole corpus once, for its digest: the dataset's identity is its content.
    documents = counted(read_documents(refs, cfg.text_column), "data: reading documents", len(refs), "documents")
    digest, sizes = _digest(documents, cfg)
    url = storage.join(root, "datasets", f"text-{digest[:12]}")
    earlier = prepared_earlier(url)
    if earlier is not None:
        return earlier
    members = {s: [refs[i] for i in splits[s]] for s in SPLITS}
    tokenizer = _train_tokenizer(cfg, members["train"])
    storage.write_bytes_atomic(storage.join(url, "tokenizer.json"), tokenizer.spec)
    baselines = {
        f"{split}_{name}_bits_per_byte": value
        for split in ("val", "test")
        for name, value in compression_bits_per_byte(counted(
            read_documents(members[split], cfg.text_column), f"data: gzip and xz of {split}", len(members[split]),
            "documents")).items()
    }
    # The train split is written in a seeded random document order (each repeat its own): workers stream it
    # in stored order, shuffling within windows, so a sorted corpus (all of encodings/, then all of email/, ...)
    # would feed the model one package at a time.
    train = members["train"]
    members["train"] = [train[i] for i in training_order(len(train), cfg.repeat, cfg.split_seed)]
    rows, tokens = {}, {}
    for split in SPLITS:
        rows[split], tokens[split] = _write_split(storage.join(url, split), members[split], tokenizer, cfg)
    info = DatasetInfo(
        url=url, kind="text", feature_columns=[TOKENS_COLUMN], label_column="", input_shape=[cfg.context],
        num_classes=tokenizer.vocab_size, num_train=rows["train"], num_val=rows["val"], num_test=rows["test"],
        digest=digest, context=cfg.context, vocab_size=tokenizer.vocab_size, tokenizer=str(cfg.tokenizer),
        split_bytes={s: sum(sizes[i] for i in splits[s]) * (cfg.repeat if s == "train" else 1) for s in SPLITS},
        split_tokens=tokens, files={s: len(members[s]) for s in SPLITS}, baselines=baselines,
    )
    mark_prepared(info)
    return info


def _digest(documents: Iterable[bytes], cfg: DataConfig) -> Tuple[str, List[int]]:
    """sha256 over the documents (each length-prefixed, in order) and the parameters; and each document's size."""
    h = hashlib.sha256()
    sizes = []
    for document in documents:
        sizes.append(len(document))
        h.update(len(document).to_bytes(8, "little"))
        h.update(document)
    vocab = cfg.vocab_size if cfg.tokenizer == TokenizerKind.bpe else 0
    h.update(
        f"text:{cfg.tokenizer}:{vocab}:{cfg.context}:{cfg.val_fraction}:{cfg.test_fraction}:"
        f"{cfg.split_seed}:{cfg.repeat}:train-shuffled".encode()
    )
    return h.hexdigest(), sizes


def _train_tokenizer(cfg: DataConfig, train: Sequence[DocumentRef]) -> TextTokenizer:
    if cfg.tokenizer == TokenizerKind.bytes:
        return ByteTokenizer()
    documents = counted(read_documents(train, cfg.text_column), "data: training the BPE tokenizer", len(train),
                        "documents")
    return train_bpe(documents, cfg.vocab_size, count=len(train))


def _write_split(url: str, refs: Sequence[DocumentRef], tokenizer: TextTokenizer, cfg: DataConfig) -> Tuple[int, int]:
    """Tokenize `refs` in Ray Data into Parquet files under `url`; returns (rows, target tokens) written.

    Each task writes one file from one batch, so a file's rows keep their order; files sort in task order.
    """
    import ray.data

    configure_ray_data()  # preserve_order: write task i gets the i-th batch of documents, so files sort in order
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)  # a write that died before info.json: its files would mix with these
    items = [asdict(r) for r in refs]
    tokenize = functools.partial(tokenize_batch, spec=tokenizer.spec, context=cfg.context, text_column=cfg.text_column)
    pa_fs, pa_path = storage.pyarrow_filesystem(url)
    tasks = max(1, math.ceil(len(items) / DOCUMENTS_PER_TASK))
    with polled(f"data: tokenizing {url.rstrip('/').rsplit('/', 1)[-1]}", tasks, lambda: _files_in(url), "files"):
        (
            ray.data.from_items(items, override_num_blocks=tasks)
            .map_batches(tokenize, batch_size=DOCUMENTS_PER_TASK, batch_format="numpy")
            .write_parquet(pa_path, filesystem=pa_fs)
        )
    return _count_written(url, cfg.context + 1)


def _files_in(url: str) -> int:
    """Parquet files under `url` so far (a write in progress: one per finished or running task)."""
    fs, path = storage.filesystem(url)
    fs.invalidate_cache(path)  # object stores' listings are cached
    return sum(1 for p in fs.ls(path, detail=False) if p.endswith(".parquet"))


def split_files(url: str) -> List[str]:
    """The Parquet files of a split folder in row order (Ray names them <uuids>_<task:06>-<i>.parquet)."""
    fs, path = storage.filesystem(url)
    return sorted((p for p in fs.ls(path, detail=False) if p.endswith(".parquet")), key=_natural_key)


def _natural_key(name: str) -> List[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _count_written(url: str, width: int) -> Tuple[int, int]:
    """(rows, target tokens that are not PAD) of a written split, streamed one row group at a time.

    Checks the rows came back in the order they were made: a row that does not start a document (with BOS)
    continues the row before it, which is full and ends with the token it starts with. Raises RuntimeError if not.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, _ = storage.filesystem(url)
    rows = targets = 0
    previous = np.full((1, width), BOS_ID, dtype=np.int32)  # stands before the first row, which must start a document
    for file in split_files(url):
        with fs.open(file, "rb") as f:
            parquet = pq.ParquetFile(f)
            for group in range(parquet.num_row_groups):
                column = parquet.read_row_group(group, columns=[TOKENS_COLUMN]).column(0).combine_chunks()
                if isinstance(column, pa.ExtensionArray):  # Ray's tensor type over a list column
                    column = column.storage
                tokens = np.concatenate([previous, column.flatten().to_numpy().reshape(-1, width)])
                _check_continuation(tokens, url)
                rows, targets = rows + len(tokens) - 1, targets + int((tokens[1:, 1:] != PAD_ID).sum())
                previous = tokens[-1:]
    return rows, targets


def _check_continuation(tokens: np.ndarray, url: str) -> None:
    starts = tokens[1:, 0] == BOS_ID
    continues = (tokens[1:, 0] == tokens[:-1, -1]) & (tokens[:-1] != PAD_ID).all(axis=1)
    if not (starts | continues).all():
        raise RuntimeError(f"the rows under {url} are not in the order they were tokenized in")
