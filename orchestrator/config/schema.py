"""Typed configuration: one keyword-only dataclass per concern.

The dataclasses are the schema. `orchestrator.config.build` registers them in Hydra's ConfigStore, so
`conf/` YAML can only select and override: a key that does not exist, a value of the wrong type or a
choice that is not offered fails when Hydra composes (choice fields are enums). A value out of range
fails in its dataclass's `__post_init__`, and checks that relate two sections live in
`orchestrator.config.validation`; `to_config` runs both, before Ray starts.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, Iterator, List, Optional, Tuple, Type, TypeVar

HEAD = "head"
"""Name of the model's own head in a phase's `trainable` and `output`."""
SAMPLERS = ("uniform", "loguniform", "choice", "randint", "grid")
S3_SSE_MODES = ("", "AES256", "aws:kms", "aws:kms:dsse")
"""Values of `storage.s3_sse` (S3's ServerSideEncryption header; '' sends none)."""
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
TASK_METRICS: Dict[str, Tuple[str, ...]] = {
    "classification": ("loss", "accuracy"),
    "causal_lm": ("loss", "perplexity", "bits_per_byte", "tokens"),
}
"""Metrics each task reports per epoch on the val split (as 'val_<name>'), beside 'train_loss'."""
TASK_HEADLINE: Dict[str, Tuple[str, ...]] = {"classification": ("accuracy",), "causal_lm": ("loss", "bits_per_byte")}
"""Metrics of TASK_METRICS that summaries show for each evaluated split (`Task.headline`, readable without torch)."""


class Choice(str, Enum):
    """Values of a choice field. OmegaConf turns the string a user types into the member of that *name*, so
    each member's name is its value; being a str, a member compares, hashes, prints and serializes as it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:  # Python 3.12 formats mixed-in enums through Enum.__format__
        return format(self.value, spec)


class BuiltinModel(Choice):
    mlp = "mlp"
    cnn = "cnn"
    gpt = "gpt"
    hf = "hf"


class Pooling(Choice):
    mean = "mean"
    cls = "cls"
    pooler = "pooler"


class TaskKind(Choice):
    classification = "classification"
    causal_lm = "causal_lm"


class DataKind(Choice):
    tabular = "tabular"
    text = "text"
    labeled_text = "labeled_text"


class TokenizerKind(Choice):
    bpe = "bpe"
    bytes = "bytes"


class Precision(Choice):
    fp32 = "fp32"
    bf16 = "bf16"


class LRSchedule(Choice):
    constant = "constant"
    cosine = "cosine"


class ParallelStrategy(Choice):
    ddp = "ddp"
    fsdp = "fsdp"
    pipeline = "pipeline"


class DistBackend(Choice):
    gloo = "gloo"
    nccl = "nccl"


# '1f1b' is no Python identifier, and members must be named as users type them: the functional form.
PipelineSchedule = Choice("PipelineSchedule", [("gpipe", "gpipe"), ("1f1b", "1f1b")])  # type: ignore[call-overload]


class ScheduleKind(Choice):
    end_to_end = "end_to_end"
    layerwise = "layerwise"
    gradual_unfreeze = "gradual_unfreeze"
    linear_probe = "linear_probe"
    custom = "custom"


class Optimizer(Choice):
    adam = "adam"
    adamw = "adamw"
    sgd = "sgd"


class TuneScheduler(Choice):
    asha = "asha"
    fifo = "fifo"


class MetricMode(Choice):
    max = "max"
    min = "min"


class TrackingMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


class TrackingBackend(Choice):
    wandb = "wandb"
    mlflow = "mlflow"


class PromoteMode(Choice):
    better = "better"
    always = "always"
    never = "never"


class QuantBackend(Choice):
    x86 = "x86"
    fbgemm = "fbgemm"
    qnnpack = "qnnpack"


class OptimizeMethod(Choice):
    int8_dynamic = "int8_dynamic"
    int8_static = "int8_static"
    prune_unstructured = "prune_unstructured"
    prune_structured = "prune_structured"
    distill = "distill"


class ExportKind(Choice):
    all = "all"
    raycluster = "raycluster"
    rayjob = "rayjob"
    rayservice = "rayservice"


class ExportJob(Choice):
    train = "train"
    sweep = "sweep"
    pipeline = "pipeline"


OPTIMIZE_METHODS: Tuple[str, ...] = tuple(m.value for m in OptimizeMethod)
EXPORT_KINDS: Tuple[str, ...] = tuple(k.value for k in ExportKind if k is not ExportKind.all)
"""The manifests `export.kind=all` writes."""

C = TypeVar("C", bound=Choice)


def require(ok: bool, name: str, message: str) -> None:
    """Raise ValueError("<name> <message>") unless `ok`: how every config check names its field."""
    if not ok:
        raise ValueError(f"{name} {message}")


def _choice(value: Any, name: str, kind: Type[C]) -> C:
    """`value` as a member of `kind`: configs built in Python may pass the plain string."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {[m.value for m in kind]}, got {value!r}") from None


@dataclass(kw_only=True)
class TaskConfig:
    name: TaskKind = TaskKind.classification
    """What a model learns, which owns its loss, metrics, registry signature and serving form:
    'classification' (class logits from feature rows) or 'causal_lm' (next-token prediction on text)."""

    def __post_init__(self) -> None:
        self.name = _choice(self.name, "task.name", TaskKind)


@dataclass(kw_only=True)
class DataConfig:
    kind: DataKind = DataKind.tabular
    """'tabular' (feature rows and an integer label), 'text' (documents tokenized into fixed-length blocks) or
    'labeled_text' (texts with a class label, tokenized for a pretrained encoder: one row of `context` ids each)."""
    source: str = "digits"
    """tabular: 'digits' (scikit-learn's bundled handwritten digits), 'synthetic', or a Parquet URL (fsspec).
    text: 'stdlib' (the Python standard library's source on the machine running the job, tests excluded),
    a file, folder or glob of text files (fsspec, local or s3://), or a Parquet table with `text_column`.
    labeled_text: 'spam_assassin' (6,046 SpamAssassin emails, ham or spam, installed by scripts/setup.sh) or a
    Parquet URL with `text_column` and `label_column`."""
    text_column: str = "text"
    """text and labeled_text: column holding the documents when `source` is a Parquet table."""
    tokenizer_path: str = ""
    """labeled_text: a Hugging Face model folder whose tokenizer.json encodes the texts; '' is the installed
    all-MiniLM-L6-v2 (as model.path)."""
    max_train_rows: int = 0
    """labeled_text: keep a seeded, stratified subset of this many train rows (0: all)."""
    max_val_rows: int = 0
    """labeled_text: keep a seeded, stratified subset of this many val rows (0: all); test is always whole."""
    file_pattern: str = "*.py"
    """text: files taken when `source` is a folder (or 'stdlib')."""
    max_files: int = 0
    """text: keep only the first N files of the fixed file order (0: all); small corpora for tests."""
    repeat: int = 1
    """text: the corpus repeated this many times (scaling experiments: 10x the data, same text)."""
    tokenizer: TokenizerKind = TokenizerKind.bpe
    """text: 'bpe' (byte-level BPE trained on the train split with `tokenizers`) or 'bytes' (raw bytes)."""
    vocab_size: int = 4096
    """text, bpe: vocabulary size of the trained tokenizer (special tokens included)."""
    context: int = 128
    """text: tokens per training block (the model sees `context` tokens and predicts the next of each).
    labeled_text: tokens per row, special tokens included (longer texts are truncated, shorter ones padded)."""
    test_fraction: float = 0.1
    """Fraction held out for the test split: tabular rows (seeded, stratified by label) or text documents
    (by file). Promotion and the compression gate compare on it; nothing selects on it."""
    feature_columns: List[str] = field(default_factory=list)
    """Parquet columns holding features; empty means every column except `label_column`.
    A single list-typed column is also accepted."""
    label_column: str = "label"
    """Parquet column holding the integer class label (labeled_text: integers, or strings mapped to their
    sorted class names)."""
    input_shape: List[int] = field(default_factory=list)
    """Shape of one sample as the model sees it (e.g. [1, 8, 8]); empty means the source's own:
    [1, 8, 8] for digits, flat features otherwise."""
    val_fraction: float = 0.2
    """Fraction of rows (tabular) or documents (text) held out for validation: what selects the best epoch,
    trial and fine-tune epoch (deterministic split)."""
    split_seed: int = 0
    """Seed of the train/val/test split."""
    synthetic_samples: int = 2000
    """Rows generated when source='synthetic'."""
    synthetic_features: int = 32
    """Features per row when source='synthetic'."""
    synthetic_classes: int = 4
    """Classes when source='synthetic'."""

    def __post_init__(self) -> None:
        self.kind = _choice(self.kind, "data.kind", DataKind)
        self.tokenizer = _choice(self.tokenizer, "data.tokenizer", TokenizerKind)
        require(bool(self.source), "data.source",
                "must be 'digits', 'synthetic', 'stdlib', 'spam_assassin' or a URL, got an empty value")
        require(0.0 < self.val_fraction < 1.0, "data.val_fraction", f"must be in (0, 1), got {self.val_fraction}")
        require(0.0 < self.test_fraction < 1.0 and self.val_fraction + self.test_fraction < 1.0,
                "data.test_fraction", f"must be in (0, 1) and leave training data, got {self.test_fraction}")
        require(self.max_files >= 0, "data.max_files", f"must be >= 0, got {self.max_files}")
        require(self.max_train_rows >= 0, "data.max_train_rows", f"must be >= 0, got {self.max_train_rows}")
        require(self.max_val_rows >= 0, "data.max_val_rows", f"must be >= 0, got {self.max_val_rows}")
        require(self.repeat >= 1, "data.repeat", f"must be >= 1, got {self.repeat}")
        require(self.vocab_size >= 260, "data.vocab_size",
                f"must be >= 260 (bytes and special tokens), got {self.vocab_size}")
        require(self.context >= 2, "data.context", f"must be >= 2, got {self.context}")
        require(all(d > 0 for d in self.input_shape), "data.input_shape", f"must be positive, got {self.input_shape}")
        require(self.synthetic_samples >= 10, "data.synthetic_samples", "must be >= 10")
        require(self.synthetic_features >= 1, "data.synthetic_features", "must be >= 1")
        require(self.synthetic_classes >= 2, "data.synthetic_classes", "must be >= 2")


@dataclass(kw_only=True)
class ModelConfig:
    name: BuiltinModel = BuiltinModel.mlp
    """Built-in architecture: 'mlp', 'cnn', 'gpt' (decoder-only transformer) or 'hf' (a transformers encoder
    classifying token ids). Ignored when `_target_` is set."""
    _target_: Optional[str] = None
    """Import path of a user model (a torch.nn.Sequential-like class or factory); called with `kwargs`
    plus `in_features`, `input_shape` and `num_classes` where its signature accepts them."""
    hidden: List[int] = field(default_factory=lambda: [128, 64])
    """MLP: width of each hidden stage."""
    channels: List[int] = field(default_factory=lambda: [16, 32])
    """CNN: output channels of each convolutional stage."""
    dropout: float = 0.0
    """Dropout after each stage (hf: before the head's Linear; the encoder keeps its config's dropouts)."""
    layers: int = 4
    """GPT: transformer blocks (each one stage)."""
    heads: int = 4
    """GPT: attention heads per block; must divide `width`."""
    width: int = 128
    """GPT: hidden size."""
    context: int = 256
    """GPT: positions the model has (data.context must not exceed it)."""
    mlp_ratio: int = 4
    """GPT: hidden size of each block's MLP as a multiple of `width`."""
    tie_embeddings: bool = True
    """GPT: the head reuses the token embedding matrix."""
    activation_checkpointing: bool = False
    """GPT and hf: recompute each block's activations in backward instead of keeping them (less memory, ~1/3 more
    compute)."""
    path: str = ""
    """hf: a local transformers model folder (config.json, *.safetensors); '' is the installed all-MiniLM-L6-v2."""
    from_scratch: bool = False
    """hf: the folder's architecture with random weights instead of its pretrained ones."""
    pooling: Pooling = Pooling.mean
    """hf: how the head pools a sequence: 'mean' over real tokens, 'cls' (first token) or the model's 'pooler'."""
    hf_config: Dict[str, Any] = field(default_factory=dict)
    """hf: the folder's config.json contents; when set, the architecture comes from it and no file is read."""
    kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for a `_target_` model."""

    def __post_init__(self) -> None:
        self.name = _choice(self.name, "model.name", BuiltinModel)
        self.pooling = _choice(self.pooling, "model.pooling", Pooling)
        if self._target_ is not None:
            require("." in self._target_, "model._target_",
                    f"must be an import path like 'pkg.module.Class', got {self._target_!r}")
        require(len(self.hidden) >= 1 and all(h > 0 for h in self.hidden), "model.hidden",
                f"must be positive widths, got {self.hidden}")
        require(len(self.channels) >= 1 and all(c > 0 for c in self.channels), "model.channels",
                f"must be positive, got {self.channels}")
        require(0.0 <= self.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {self.dropout}")
        for name in ("layers", "heads", "width", "context", "mlp_ratio"):
            require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.width % self.heads == 0, "model.heads",
                f"must divide model.width ({self.width}), got {self.heads}")


@dataclass(kw_only=True)
class ParallelConfig:
    strategy: ParallelStrategy = ParallelStrategy.ddp
    """How workers split a training run: 'ddp' (replicated model, gradients all-reduced), 'fsdp'
    (FSDP2 fully_shard: parameters, gradients and optimizer state sharded across workers) or
    'pipeline' (the trainable stages split across workers, micro-batched with torch.distributed.pipelining)."""
    backend: DistBackend = DistBackend.gloo
    """torch.distributed backend: 'gloo' (CPU) or 'nccl' (GPU)."""
    pipeline_schedule: PipelineSchedule = PipelineSchedule("1f1b")  # type: ignore[valid-type]
    """pipeline: 'gpipe' (all forwards, then all backwards) or '1f1b' (interleaved, less activation memory)."""
    microbatches: int = 4
    """pipeline: micro-batches per batch; the batch size must be divisible by it."""

    def __post_init__(self) -> None:
        self.strategy = _choice(self.strategy, "parallel.strategy", ParallelStrategy)
        self.backend = _choice(self.backend, "parallel.backend", DistBackend)
        self.pipeline_schedule = _choice(self.pipeline_schedule, "parallel.pipeline_schedule", PipelineSchedule)
        require(self.microbatches >= 1, "parallel.microbatches", f"must be >= 1, got {self.microbatches}")


@dataclass(kw_only=True)
class PhaseConfig:
    """One phase of a custom schedule."""

    trainable: List[str] = field(default_factory=lambda: ["*"])
    """Stage names (and/or 'head') trained in this phase; '*' means every stage and the head."""
    epochs: int = 1
    """Epochs of this phase."""
    lr_scale: float = 1.0
    """Learning rate of the phase, as a multiple of train.lr."""
    stage_lr_scale: Dict[str, float] = field(default_factory=dict)
    """Extra multiplier per trainable stage name (e.g. {block0: 0.1})."""
    output: str = "head"
    """HEAD ('head', the model's head) or a stage name: train through that stage and a fresh auxiliary head on it."""

    def __post_init__(self) -> None:
        require(len(self.trainable) >= 1, "schedule.phases.trainable", "must name at least one stage, 'head' or '*'")
        require(self.epochs >= 1, "schedule.phases.epochs", f"must be >= 1, got {self.epochs}")
        require(self.lr_scale > 0, "schedule.phases.lr_scale", f"must be > 0, got {self.lr_scale}")
        require(all(v > 0 for v in self.stage_lr_scale.values()), "schedule.phases.stage_lr_scale",
                "values must be > 0")


@dataclass(kw_only=True)
class ScheduleConfig:
    kind: ScheduleKind = ScheduleKind.end_to_end
    """'end_to_end' (one phase, everything trainable), 'layerwise' (greedy: phase k trains stage k with an
    auxiliary head, the stages below frozen; then an optional joint fine-tune), 'gradual_unfreeze' (the head on
    a frozen body, then stages unfrozen from the top down), 'linear_probe' (one phase: the head alone on the frozen
    body) or 'custom' (`phases` as written)."""
    phase_epochs: List[int] = field(default_factory=list)
    """Epochs of each phase (its length must match the phase count); empty splits train.epochs evenly, the
    remainder going to the last phases. Sweep phase boundaries with e.g. [choice,[2,2,8],[4,4,4]]."""
    finetune: bool = True
    """layerwise: end with a phase that trains every stage and the head jointly."""
    finetune_lr_scale: float = 1.0
    """layerwise: learning rate of the joint fine-tune, as a multiple of train.lr."""
    lr_decay: float = 1.0
    """Per-stage learning-rate decay going down from the head: a stage d stages below the head trains at
    lr * lr_decay**d (gradual_unfreeze, and the layerwise fine-tune). 1.0 means no decay."""
    head_lr_scale: float = 1.0
    """Learning rate of the head (and of auxiliary heads) as a multiple of what the schedule gives it: a fresh
    head on a pretrained body usually trains at 10-100x the body's rate."""
    unfreeze_depth: int = 0
    """gradual_unfreeze: stop once this many stages (counted from the top) are unfrozen; 0 unfreezes every
    stage. A pretrained transformer keeps its lower layers frozen: unfreeze_depth=3 trains the head, then the
    top 1, 2 and 3 layers (4 phases)."""
    cache_frozen: bool = True
    """Compute a frozen prefix's outputs once per phase and train the phase on them (same results, less compute)."""
    cache_max_mb: float = 4096.0
    """Largest frozen-prefix cache (MB per worker: rows x the prefix's output per row) a phase keeps; a phase
    whose cache would be larger recomputes its prefix every batch instead (a transformer layer's output is
    context x (width + 1) x 4 bytes per row)."""
    phases: List[PhaseConfig] = field(default_factory=list)
    """kind=custom: the phases, in order."""

    def __post_init__(self) -> None:
        self.kind = _choice(self.kind, "schedule.kind", ScheduleKind)
        require(all(e >= 1 for e in self.phase_epochs), "schedule.phase_epochs",
                f"must all be >= 1, got {self.phase_epochs}")
        require(self.finetune_lr_scale > 0, "schedule.finetune_lr_scale", f"must be > 0, got {self.finetune_lr_scale}")
        require(0 < self.lr_decay <= 1, "schedule.lr_decay", f"must be in (0, 1], got {self.lr_decay}")
        require(self.head_lr_scale > 0, "schedule.head_lr_scale", f"must be > 0, got {self.head_lr_scale}")
        require(self.unfreeze_depth >= 0, "schedule.unfreeze_depth", f"must be >= 0, got {self.unfreeze_depth}")
        require(self.cache_max_mb >= 0, "schedule.cache_max_mb", f"must be >= 0, got {self.cache_max_mb}")
        require((self.kind == ScheduleKind.custom) == bool(self.phases), "schedule.phases",
                "must be given exactly when schedule.kind=custom")


@dataclass(kw_only=True)
class CompareConfig:
    """jobs.compare: schedules raced on the same data and epoch budget."""

    schedules: List[ScheduleKind] = field(
        default_factory=lambda: [ScheduleKind.end_to_end, ScheduleKind.layerwise, ScheduleKind.gradual_unfreeze])
    """Schedule kinds to compare; the configured `schedule` supplies the settings of its own kind."""
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    """train.seed of each repetition (weights and data order; the split stays fixed)."""
    schedule_settings: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    """ScheduleConfig fields per schedule kind other than the configured one, e.g.
    {gradual_unfreeze: {unfreeze_depth: 3, lr_decay: 0.8}} (the configured `schedule` keeps its own)."""
    from_scratch: bool = False
    """Also run end_to_end on the same architecture with random weights (model.from_scratch=true; model=hf):
    the row 'end_to_end_scratch', what pretraining is worth."""

    def __post_init__(self) -> None:
        require(len(self.schedules) >= 1, "compare.schedules", "must name at least one schedule")
        self.schedules = [_choice(kind, "compare.schedules", ScheduleKind) for kind in self.schedules]
        require(len(self.seeds) >= 1, "compare.seeds", "must list at least one seed")
        unknown = sorted(set(self.schedule_settings) - {k.value for k in ScheduleKind})
        require(not unknown, "compare.schedule_settings", f"names unknown schedule kinds {unknown}")


@dataclass(kw_only=True)
class ScalingConfig:
    num_workers: int = 2
    """Ray Train workers per training run."""
    cpus_per_worker: float = 1.0
    """Logical CPUs each worker reserves (fractions let several trials share a small machine)."""
    use_gpu: bool = False
    """Give each worker one GPU."""
    local_num_cpus: int = 10
    """Logical CPUs of the embedded local Ray (ignored when joining a cluster via RAY_ADDRESS)."""
    torch_threads: int = 1
    """Intra-op threads per worker; 1 avoids oversubscribing a small machine."""

    def __post_init__(self) -> None:
        require(self.num_workers >= 1, "scaling.num_workers", f"must be >= 1, got {self.num_workers}")
        require(self.cpus_per_worker > 0, "scaling.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")
        require(self.local_num_cpus >= 1, "scaling.local_num_cpus", f"must be >= 1, got {self.local_num_cpus}")
        require(self.torch_threads >= 1, "scaling.torch_threads", f"must be >= 1, got {self.torch_threads}")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 12
    """Passes over the training split."""
    batch_size: int = 64
    """Global batch size, split evenly across workers."""
    lr: float = 0.003
    """Learning rate."""
    optimizer: Optimizer = Optimizer.adam
    """'adam', 'adamw' or 'sgd' (momentum 0.9)."""
    weight_decay: float = 0.0
    """L2 penalty."""
    seed: int = 0
    """Seed for weights and shuffling."""
    max_failures: int = 2
    """Times a failed run is restarted from its latest checkpoint."""
    checkpoints_to_keep: int = 2
    """Epoch checkpoints kept per run (best by the task's selection metric)."""
    precision: Precision = Precision.fp32
    """'fp32' or 'bf16' (autocast on the worker's device; FSDP2's mixed-precision policy under fsdp)."""
    grad_accum_steps: int = 1
    """Micro-batches whose gradients add up to one optimizer step (batch_size is per micro-batch)."""
    grad_clip: float = 0.0
    """Largest global gradient norm before a step (0: no clipping)."""
    lr_schedule: LRSchedule = LRSchedule.constant
    """'constant', or 'cosine': linear warmup over `warmup_steps`, then cosine decay to lr * min_lr_ratio."""
    warmup_steps: int = 0
    """Optimizer steps of linear learning-rate warmup."""
    min_lr_ratio: float = 0.1
    """cosine: the final learning rate as a fraction of `lr`."""
    steps_per_epoch: int = 0
    """Optimizer steps per epoch (report, checkpoint, validate); the data stream continues across epochs.
    0: one full pass over the training split per epoch."""
    val_batches: int = 0
    """Validation batches evaluated per epoch (0: the whole val split)."""
    peak_tflops: float = 0.0
    """Peak dense TFLOP/s of one worker's device in train.precision, for MFU; 0 takes it from a table of
    known GPUs (none for CPUs: MFU is then not reported)."""

    def __post_init__(self) -> None:
        require(self.epochs >= 1, "train.epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "train.batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.lr > 0, "train.lr", f"must be > 0, got {self.lr}")
        self.optimizer = _choice(self.optimizer, "train.optimizer", Optimizer)
        require(self.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        require(self.max_failures >= 0, "train.max_failures", f"must be >= 0, got {self.max_failures}")
        require(self.checkpoints_to_keep >= 1, "train.checkpoints_to_keep", "must be >= 1")
        self.precision = _choice(self.precision, "train.precision", Precision)
        self.lr_schedule = _choice(self.lr_schedule, "train.lr_schedule", LRSchedule)
        require(self.grad_accum_steps >= 1, "train.grad_accum_steps", f"must be >= 1, got {self.grad_accum_steps}")
        require(self.grad_clip >= 0, "train.grad_clip", f"must be >= 0, got {self.grad_clip}")
        require(self.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(0.0 <= self.min_lr_ratio <= 1.0, "train.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        require(self.steps_per_epoch >= 0, "train.steps_per_epoch", f"must be >= 0, got {self.steps_per_epoch}")
        require(self.val_batches >= 0, "train.val_batches", f"must be >= 0, got {self.val_batches}")
        require(self.peak_tflops >= 0, "train.peak_tflops", f"must be >= 0, got {self.peak_tflops}")


@dataclass(kw_only=True)
class TuneConfig:
    num_samples: int = 8
    """Trials sampled from the search space (each grid point is repeated this many times)."""
    max_concurrent_trials: int = 4
    """Trials running at once."""
    scheduler: TuneScheduler = TuneScheduler.asha
    """'asha' (stops weak trials early) or 'fifo' (runs every trial to the end)."""
    metric: str = "val_accuracy"
    """Metric that ranks trials."""
    mode: MetricMode = MetricMode.max
    """'max' or 'min'."""
    grace_period: int = 2
    """ASHA: epochs before a trial may be stopped."""
    reduction_factor: int = 2
    """ASHA: keep the top 1/reduction_factor at each rung."""
    trial_cpus: float = 0.01
    """Logical CPUs of each trial's driver (the workers reserve their own)."""
    max_failures: int = 2
    """Times a trial whose process died is retried (its training resumes from its newest complete
    checkpoint); a trial that fails more often is reported as errored, never dropped."""
    search_space: Dict[str, Any] = field(
        default_factory=lambda: {
            "train": {"lr": ["loguniform", 0.001, 0.01], "batch_size": ["choice", 32, 64]},
            "model": {"hidden": ["choice", [128, 64], [256, 128]]},
        }
    )
    """Nested like the config; each leaf is [sampler, *args] with sampler one of uniform, loguniform,
    randint (args: low, high) or choice, grid (args: the values). Override a leaf with
    tune.search_space.train.lr=[choice,0.01,0.003]; add one with +tune.search_space.model.dropout=[uniform,0,0.3];
    drop one with tune.search_space.model.hidden=null."""

    def __post_init__(self) -> None:
        require(self.num_samples >= 1, "tune.num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.max_concurrent_trials >= 1, "tune.max_concurrent_trials", "must be >= 1")
        self.scheduler = _choice(self.scheduler, "tune.scheduler", TuneScheduler)
        self.mode = _choice(self.mode, "tune.mode", MetricMode)
        require(self.grace_period >= 1, "tune.grace_period", "must be >= 1")
        require(self.reduction_factor >= 2, "tune.reduction_factor", "must be >= 2")
        require(self.trial_cpus > 0, "tune.trial_cpus", "must be > 0 (Ray rejects 0-CPU trials)")
        require(self.max_failures >= 0, "tune.max_failures", f"must be >= 0, got {self.max_failures}")
        for path, spec in iter_search_space(self.search_space):
            name = f"tune.search_space.{path}"
            require(_is_sampler(spec), name,
                    f"must be [sampler, *args] with sampler in {list(SAMPLERS)}, got {spec!r}")
            sampler, args = spec[0], list(spec[1:])
            if sampler in ("uniform", "loguniform", "randint"):
                # Check the types first: comparing a string bound would raise a TypeError naming no field.
                numeric = len(args) == 2 and all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
                require(numeric and args[0] < args[1], name,
                        f"needs numbers [low, high] with low < high, got {args!r}")
                require(sampler != "loguniform" or args[0] > 0, name, f"loguniform needs low > 0, got {args!r}")
            else:
                require(isinstance(args, list) and len(args) >= 1, name, f"needs a non-empty list, got {args!r}")


@dataclass(kw_only=True)
class AuthConfig:
    enabled: bool = True
    """Require an API key (`Authorization: Bearer <key>`) on every model and admin route.
    False serves without keys and logs a warning at deploy time."""
    keys_url: str = ""
    """fsspec URL of the hashed key store; empty means <storage.root>/serving/api_keys.json."""
    cache_ttl_s: float = 1.0
    """How long an ingress replica trusts its copy of the key store: a revoked key stops working
    within this time."""

    def __post_init__(self) -> None:
        require(self.cache_ttl_s >= 0, "serve.auth.cache_ttl_s", f"must be >= 0, got {self.cache_ttl_s}")


@dataclass(kw_only=True)
class LimitsConfig:
    max_body_bytes: int = 8 * 1024 * 1024
    """Largest infer body accepted (larger is answered 413 before it is parsed)."""
    request_timeout_s: float = 30.0
    """Longest an infer request may wait for the model; longer is answered 504."""
    max_pending_requests: int = 64
    """Infer requests one ingress replica holds at once; more are answered 503 with Retry-After."""
    retry_after_s: int = 1
    """Seconds a client is told to wait (Retry-After) when the queue is full."""
    allow_non_finite: bool = False
    """Accept NaN and +-Infinity in infer data (JSON NaN/Infinity tokens, or values beyond FP32)."""

    def __post_init__(self) -> None:
        require(self.max_body_bytes >= 1024, "serve.limits.max_body_bytes",
                f"must be >= 1024, got {self.max_body_bytes}")
        require(self.request_timeout_s > 0, "serve.limits.request_timeout_s",
                f"must be > 0, got {self.request_timeout_s}")
        require(self.max_pending_requests >= 1, "serve.limits.max_pending_requests",
                f"must be >= 1, got {self.max_pending_requests}")
        require(self.retry_after_s >= 1, "serve.limits.retry_after_s", f"must be >= 1, got {self.retry_after_s}")


@dataclass(kw_only=True)
class RolloutConfig:
    auto_rollback: bool = True
    """Drop the candidate by itself when it breaks `max_error_rate` or `max_p99_ms`."""
    max_error_rate: float = 0.05
    """Share of the candidate's requests that may fail (5xx or timeout) in the window."""
    max_p99_ms: float = 2000.0
    """p99 latency (ms) a classifier candidate may reach in the window."""
    max_p99_ttft_ms: float = 2000.0
    """p99 time to first token (ms) a language-model candidate may reach in the window (its completions,
    and its v2 infer passes, which are one prefill each)."""
    min_requests: int = 20
    """Candidate requests in the window before it is judged at all."""
    window_s: float = 60.0
    """Sliding window (seconds) of candidate requests that is judged."""
    sync_interval_s: float = 0.5
    """How often each ingress replica reports outcomes and fetches the routing table."""

    def __post_init__(self) -> None:
        require(0.0 <= self.max_error_rate <= 1.0, "serve.rollout.max_error_rate",
                f"must be in [0, 1], got {self.max_error_rate}")
        require(self.max_p99_ms > 0, "serve.rollout.max_p99_ms", f"must be > 0, got {self.max_p99_ms}")
        require(self.max_p99_ttft_ms > 0, "serve.rollout.max_p99_ttft_ms", f"must be > 0, got {self.max_p99_ttft_ms}")
        require(self.min_requests >= 1, "serve.rollout.min_requests", f"must be >= 1, got {self.min_requests}")
        require(self.window_s > 0, "serve.rollout.window_s", f"must be > 0, got {self.window_s}")
        require(self.sync_interval_s > 0, "serve.rollout.sync_interval_s", f"must be > 0, got {self.sync_interval_s}")


@dataclass(kw_only=True)
class GenerationConfig:
    max_running_sequences: int = 32
    """Sequences one replica decodes at once per language-model version (the engine's KV-cache slots)."""
    max_waiting_sequences: int = 64
    """Sequences that may wait for a slot per replica and version; more are answered 429 with Retry-After."""
    max_prompt_tokens: int = 0
    """Longest prompt accepted, in tokens (BOS included); 0 means the model's context."""
    max_tokens_limit: int = 0
    """Largest max_tokens one request may ask for; 0 means the model's context."""
    default_max_tokens: int = 16
    """Tokens generated per sequence when a request gives no max_tokens (OpenAI's default)."""

    def __post_init__(self) -> None:
        for name in ("max_running_sequences", "max_waiting_sequences", "default_max_tokens"):
            require(getattr(self, name) >= 1, f"serve.generation.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_prompt_tokens", "max_tokens_limit"):
            require(getattr(self, name) >= 0, f"serve.generation.{name}",
                    f"must be >= 0 (0: the model's context), got {getattr(self, name)}")


@dataclass(kw_only=True)
class ServeConfig:
    host: str = "127.0.0.1"
    """Address the HTTP proxy binds (keep loopback unless the network is trusted)."""
    port: int = 8000
    """HTTP port of the proxy in front of the replicas (HAProxy, or Serve's own proxy)."""
    app_name: str = "orchestrator"
    """Ray Serve application name."""
    model_version: str = "production"
    """Registry version number or alias to deploy (jobs.deploy), or a reference to one of
    registry.model_name ("models:/digits@production", "digits:3"); other models are served at this
    alias, or at their latest version when they lack it."""
    min_replicas: int = 1
    """Autoscaling lower bound of the serving replicas, each of which parses requests and runs
    the models (0: scale to zero when idle)."""
    max_replicas: int = 2
    """Autoscaling upper bound."""
    target_ongoing_requests: float = 4.0
    """Autoscaling target of in-flight requests per replica."""
    downscale_delay_s: float = 600.0
    """Seconds of low load before a replica is removed (with min_replicas=0: before the model
    scales to zero)."""
    replica_cpus: float = 0.25
    """Logical CPUs each serving replica reserves."""
    health_check_period_s: float = 2.0
    """Seconds between Serve's health checks of each replica: a replica that died is replaced
    about this soon after (Serve's own default is 10)."""
    batching: bool = True
    """Merge requests that arrive while a forward pass runs into the next one (serve.batching: a
    request that finds the model idle runs at once, nothing waits on a timer)."""
    max_batch_size: int = 32
    """Requests merged into one forward pass at most."""
    max_models_per_replica: int = 4
    """Model versions one replica keeps loaded (least recently used leaves first)."""
    access_log: bool = False
    """Log every request in the replicas (Serve's access log; off: it costs latency on every request)."""
    max_rows_per_request: int = 1024
    """Rows one infer request may carry (more is answered 413)."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """API keys and scopes."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Request size, time and queue limits."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Canary judging and automatic rollback."""
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    """Language models (/v1/completions): sequences per replica, prompt and completion length limits."""
    write_config: str = ""
    """jobs.deploy: write a Serve config file (for `serve run` / `serve deploy`) to this path and exit
    instead of deploying."""
    block: bool = True
    """Keep serving after the pipeline finishes (False: exit right after the endpoint check)."""

    def __post_init__(self) -> None:
        require(1 <= self.port <= 65535, "serve.port", f"must be a TCP port, got {self.port}")
        require(bool(self.model_version), "serve.model_version", "must not be empty")
        require(self.min_replicas >= 0, "serve.min_replicas", f"must be >= 0, got {self.min_replicas}")
        require(self.max_replicas >= max(1, self.min_replicas), "serve.max_replicas",
                f"must be >= 1 and >= serve.min_replicas ({self.min_replicas}), got {self.max_replicas}")
        require(self.target_ongoing_requests > 0, "serve.target_ongoing_requests", "must be > 0")
        require(self.downscale_delay_s >= 0, "serve.downscale_delay_s", "must be >= 0")
        require(self.replica_cpus > 0, "serve.replica_cpus", "must be > 0")
        require(self.health_check_period_s > 0, "serve.health_check_period_s",
                f"must be > 0, got {self.health_check_period_s}")
        require(self.max_batch_size >= 1, "serve.max_batch_size", "must be >= 1")
        require(self.max_models_per_replica >= 1, "serve.max_models_per_replica", "must be >= 1")
        require(self.max_rows_per_request >= 1, "serve.max_rows_per_request", "must be >= 1")


@dataclass(kw_only=True)
class StorageConfig:
    root: str = "file://./runs"
    """fsspec URL holding datasets, Train/Tune results, the registry and reports
    (file://, s3://, gs://, memory:// for driver-only tests)."""
    s3_sse: str = ""
    """s3:// roots: server-side encryption of every object this process writes: '' (the bucket's default),
    'AES256' (S3-managed keys), 'aws:kms' or 'aws:kms:dsse' (KMS keys). Ignored on other roots."""
    s3_sse_kms_key_id: str = ""
    """s3_sse=aws:kms[:dsse]: the KMS key (id, ARN or alias); empty uses the account's default S3 KMS key."""

    def __post_init__(self) -> None:
        require(bool(self.root), "storage.root", "must not be empty")
        require(self.s3_sse in S3_SSE_MODES, "storage.s3_sse",
                f"must be one of {list(S3_SSE_MODES)}, got {self.s3_sse!r}")
        require(not self.s3_sse_kms_key_id or self.s3_sse.startswith("aws:kms"), "storage.s3_sse_kms_key_id",
                f"needs storage.s3_sse=aws:kms or aws:kms:dsse, got s3_sse={self.s3_sse!r}")
        if self.root.startswith("file://") or "://" not in self.root:
            # Resolve relative paths once, at the driver, so every worker sees the same place.
            path = self.root.removeprefix("file://")
            self.root = "file://" + os.path.abspath(os.path.expanduser(path))


@dataclass(kw_only=True)
class TrackingConfig:
    enabled: bool = True
    """Log each trial (rank 0 only) to the tracking backend."""
    backend: TrackingBackend = TrackingBackend.wandb
    """'wandb' (Weights & Biases) or 'mlflow' (one MLflow run per trial, tagged with its registry version)."""
    project: str = "orchestrator"
    """wandb project, or MLflow experiment name."""
    mode: TrackingMode = TrackingMode.offline
    """wandb mode: 'offline' (sync later with `wandb sync`), 'online' or 'disabled'."""
    dir: Optional[str] = None
    """Local directory for wandb files; default <storage root>/wandb for a local root, else ./wandb."""
    uri: Optional[str] = None
    """MLflow tracking URI (a server 'http(s)://...', 'sqlite:////abs/path.db', 'databricks'); default a
    sqlite store at <storage root>/mlflow/mlflow.db (local roots only: set it for an s3:// root)."""

    def __post_init__(self) -> None:
        self.mode = _choice(self.mode, "tracking.mode", TrackingMode)
        self.backend = _choice(self.backend, "tracking.backend", TrackingBackend)
        require(self.uri is None or bool(self.uri.strip()), "tracking.uri", "must not be empty (leave it unset)")
        if self.uri and self.uri.startswith("sqlite:///") and not self.uri.startswith("sqlite:////"):
            # A relative database path would resolve in each Ray worker's own directory: resolve it once, here.
            self.uri = "sqlite:///" + os.path.abspath(os.path.expanduser(self.uri.removeprefix("sqlite:///")))


@dataclass(kw_only=True)
class EncryptionConfig:
    enabled: bool = False
    """Encrypt the weights of every new version before it is written (AES-256-GCM under a data key per
    version, wrapped by the master key; see orchestrator.registry.crypto). Versions already encrypted are
    read with the master key below whatever this says."""
    key_env: str = "ORCHESTRATOR_MASTER_KEY"
    """Environment variable holding the master key (base64 of 32 bytes), read where and when weights are
    written or loaded (the driver, the Serve weights holder)."""
    key_file: str = ""
    """File holding the master key (base64 of 32 bytes); when set it is used instead of `key_env`.
    Must exist at this path wherever weights are written or loaded."""

    def __post_init__(self) -> None:
        require(self.key_env == "" or _ENV_NAME.fullmatch(self.key_env) is not None, "registry.encryption.key_env",
                f"must be an environment variable name (letters, digits, '_'), got {self.key_env!r}")
        require(bool(self.key_env or self.key_file), "registry.encryption.key_env",
                "must not be empty unless registry.encryption.key_file names the master key file")
        if self.key_file:
            # Resolved once, at the driver, so every process reading it sees the same file.
            self.key_file = os.path.abspath(os.path.expanduser(self.key_file))


@dataclass(kw_only=True)
class RegistryConfig:
    model_name: str = "digits"
    """Registry model that training and sweeps add versions to."""
    promote_alias: str = "production"
    """Alias a new version takes when `promote` decides so (others get 'candidate'); empty leaves aliases alone."""
    promote: PromoteMode = PromoteMode.better
    """When a new version takes `promote_alias`: 'better' (it beats the aliased version on the same test
    data by more than `promote_margin`, or nothing holds the alias yet), 'always' or 'never'."""
    promote_margin: float = 0.0
    """How much better than the aliased version a new one must be, in the units of the task's test
    metric (classification: test accuracy, 0.01 = one point; causal_lm: test loss in nats per token)."""
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)
    """Weights encrypted at rest, and where the master key comes from."""

    def __post_init__(self) -> None:
        self.promote = _choice(self.promote, "registry.promote", PromoteMode)
        require(self.promote_margin >= 0.0, "registry.promote_margin", f"must be >= 0, got {self.promote_margin}")
        require(self.promote_alias != "candidate", "registry.promote_alias",
                "must not be 'candidate' (the alias of versions that are not promoted)")
        require(is_identifier(self.model_name), "registry.model_name",
                f"must be letters, digits, '-', '_' or '.', got {self.model_name!r}")
        require(self.promote_alias == "" or is_identifier(self.promote_alias), "registry.promote_alias",
                f"invalid alias {self.promote_alias!r}")
        require(not self.promote_alias.isdigit(), "registry.promote_alias",
                "must not be a number (numbers are versions)")


@dataclass(kw_only=True)
class QuantizeConfig:
    backend: QuantBackend = QuantBackend.x86
    """torch quantized engine of the int8 kernels: 'x86' or 'fbgemm' (x86 CPUs), 'qnnpack' (ARM).
    Recorded in the variant; the serving machine must support the same engine."""
    calibration_rows: int = 512
    """int8_static: training rows run through the model to calibrate activation ranges."""

    def __post_init__(self) -> None:
        self.backend = _choice(self.backend, "optimize.quantize.backend", QuantBackend)
        require(self.calibration_rows >= 1, "optimize.quantize.calibration_rows",
                f"must be >= 1, got {self.calibration_rows}")


@dataclass(kw_only=True)
class PruneConfig:
    sparsity: float = 0.5
    """Fraction pruned by L1 magnitude: of all weight entries (prune_unstructured, one global threshold),
    or of the output units/channels of every layer but the head (prune_structured)."""
    finetune_epochs: int = 2
    """Epochs of Ray Train fine-tuning after pruning, the pruned entries held at zero (0: none)."""
    lr: float = 0.001
    """Learning rate of the fine-tune."""

    def __post_init__(self) -> None:
        require(0.0 < self.sparsity < 1.0, "optimize.prune.sparsity", f"must be in (0, 1), got {self.sparsity}")
        require(self.finetune_epochs >= 0, "optimize.prune.finetune_epochs",
                f"must be >= 0, got {self.finetune_epochs}")
        require(self.lr > 0, "optimize.prune.lr", f"must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class DistillConfig:
    student: Dict[str, Any] = field(default_factory=lambda: {"hidden": [32]})
    """Overrides of the parent's model config that make the smaller student (e.g. {hidden: [32]})."""
    temperature: float = 4.0
    """Softmax temperature of the teacher's and the student's soft targets."""
    alpha: float = 0.7
    """Weight of the soft-target loss (KL to the teacher, scaled by temperature^2); 1 - alpha weighs the labels."""
    epochs: int = 12
    """Epochs of student training on Ray Train."""
    lr: float = 0.01
    """Learning rate of the student."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.student) - {f.name for f in dataclasses.fields(ModelConfig)})
        require(not unknown, "optimize.distill.student", f"names no model config field: {unknown}")
        try:
            ModelConfig(**self.student)
        except ValueError as err:
            raise ValueError(f"optimize.distill.student is not a valid model: {err}") from None
        require(self.temperature > 0, "optimize.distill.temperature", f"must be > 0, got {self.temperature}")
        require(0.0 <= self.alpha <= 1.0, "optimize.distill.alpha", f"must be in [0, 1], got {self.alpha}")
        require(self.epochs >= 1, "optimize.distill.epochs", f"must be >= 1, got {self.epochs}")
        require(self.lr > 0, "optimize.distill.lr", f"must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class OptimizeConfig:
    methods: List[OptimizeMethod] = field(default_factory=list)
    """Compressed variants to make, each gated on accuracy: int8_dynamic, int8_static, prune_unstructured,
    prune_structured, distill. Empty skips the step."""
    source: str = "production"
    """jobs.optimize: registry version number, alias or reference ("digits:3") to compress (the pipeline
    uses the version it just registered)."""
    tolerance: float = 0.01
    """Largest test accuracy drop against the parent (absolute: 0.01 is one point) a variant may show and be
    registered."""
    set_aliases: bool = True
    """Point the alias '<method>' (e.g. int8_dynamic) at each registered variant, so it deploys by alias."""
    latency_repeats: int = 30
    """Timed forward passes per batch size in the report (median kept)."""
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    """int8 quantization."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """L1 magnitude pruning and its fine-tune."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Knowledge distillation into a smaller student."""

    def __post_init__(self) -> None:
        self.methods = [_choice(method, "optimize.methods", OptimizeMethod) for method in self.methods]
        require(len(set(self.methods)) == len(self.methods), "optimize.methods",
                f"must not repeat a method, got {self.methods}")
        require(bool(self.source), "optimize.source", "must not be empty")
        require(0.0 <= self.tolerance <= 1.0, "optimize.tolerance", f"must be in [0, 1], got {self.tolerance}")
        require(self.latency_repeats >= 1, "optimize.latency_repeats", f"must be >= 1, got {self.latency_repeats}")


@dataclass(kw_only=True)
class ExportConfig:
    """jobs.export: KubeRay manifests (RayCluster, RayJob, RayService) of this same config."""

    out_dir: str = "k8s"
    """Folder the manifests are written to, one `<kind>.yaml` each (created if missing)."""
    kind: ExportKind = ExportKind.all
    """Manifests to write: 'all', 'raycluster', 'rayjob' or 'rayservice'."""
    job: ExportJob = ExportJob.sweep
    """Job the RayJob runs: 'train', 'sweep' or 'pipeline', with the Hydra overrides jobs.export was given."""
    image: str = "rayproject/ray:2.60.0-py311"
    """Image of every Ray pod. It must contain this project (jobs.*, serve.app, conf/): build
    cluster/kuberay/Dockerfile, which starts from this official tag, and push it; the official image alone
    cannot run the jobs or the Serve app."""
    namespace: str = "default"
    """Kubernetes namespace of the manifests."""
    name: str = "orchestrator"
    """Name of the RayCluster; the RayJob is `<name>-job`, the RayService `<name>-serve`."""
    head_cpus: int = 2
    """CPU request (and limit) of the head pod, whole CPUs (Ray's num-cpus is a count). Ray schedules work
    there too (the worker replica count leaves the head out, so it is spare room for trial drivers and Serve
    replicas)."""
    head_memory: str = "8Gi"
    """Memory request (and limit) of the head pod, a Kubernetes quantity."""
    worker_cpus: int = 4
    """CPU request (and limit) of each worker pod, whole CPUs. A pod holds floor(worker_cpus / scaling.cpus_per_worker)
    training workers; a run needs ceil(scaling.num_workers / that) pods."""
    worker_memory: str = "16Gi"
    """Memory request (and limit) of each worker pod, a Kubernetes quantity."""
    worker_gpus: int = 0
    """GPUs (nvidia.com/gpu) of each worker pod; scaling.use_gpu=true needs at least 1."""
    token_auth: bool = True
    """Ray token authentication (KubeRay `authOptions.mode: token`): every Ray API, the dashboard and
    the Jobs API ask for the token. False turns it off (only on a network you trust)."""
    token_secret: str = ""
    """Secret holding the token under the key `auth_token`; empty lets KubeRay create one per cluster."""
    env_secret: str = ""
    """Secret whose keys become environment variables of every Ray container (e.g. AWS_ACCESS_KEY_ID,
    AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for an s3:// storage.root); empty adds none."""

    def __post_init__(self) -> None:
        require(bool(self.out_dir), "export.out_dir", "must not be empty")
        self.kind = _choice(self.kind, "export.kind", ExportKind)
        self.job = _choice(self.job, "export.job", ExportJob)
        require(bool(self.image), "export.image", "must not be empty")
        require(_is_dns_label(self.namespace, 63), "export.namespace",
                f"must be a DNS-1123 label, got {self.namespace!r}")
        # KubeRay refuses RayJob/RayService names over 47 characters; '-serve' is the longest suffix added.
        require(_is_dns_label(self.name, 41), "export.name",
                f"must be a DNS-1123 label of at most 41 characters, got {self.name!r}")
        for name in ("head_cpus", "worker_cpus"):
            require(getattr(self, name) >= 1, f"export.{name}", f"must be >= 1, got {getattr(self, name)}")
        for name in ("head_memory", "worker_memory"):
            require(bool(_QUANTITY.fullmatch(getattr(self, name))), f"export.{name}",
                    f"must be a Kubernetes quantity like 8Gi, got {getattr(self, name)!r}")
        require(self.worker_gpus >= 0, "export.worker_gpus", f"must be >= 0, got {self.worker_gpus}")
        for name in ("token_secret", "env_secret"):
            value = getattr(self, name)
            require(value == "" or _is_dns_label(value, 253, extra="-."), f"export.{name}",
                    f"must be empty or a Secret name, got {value!r}")


_QUANTITY = re.compile(r"[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?")


def _is_dns_label(name: str, max_length: int, extra: str = "-") -> bool:
    # RFC 1123 labels; extra="-." also admits subdomain names (Secrets).
    inner = re.escape(extra)
    return len(name) <= max_length and bool(re.fullmatch(rf"[a-z0-9]([a-z0-9{inner}]*[a-z0-9])?", name))


@dataclass(kw_only=True)
class PipelineConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    """What is learned: its loss, metrics, signature and serving form."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where samples come from and how they are split."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture, as ordered stages plus a head."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel plan of a training run."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """Which stages train when: end-to-end or layer-staged."""
    compare: CompareConfig = field(default_factory=CompareConfig)
    """jobs.compare: which schedules, over which seeds."""
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    """Workers and resources."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation of one run."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """The hyperparameter sweep."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """The HTTP endpoint."""
    storage: StorageConfig = field(default_factory=StorageConfig)
    """Where state lives."""
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    """Experiment tracking."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """Versioned models."""
    optimize: OptimizeConfig = field(default_factory=OptimizeConfig)
    """Compressed variants of a registered version (off unless `optimize.methods` names some)."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """jobs.export: KubeRay manifests of this config."""
    run_name: str = "default"
    """Names this run's Train/Tune results under the storage root (set by experiment files too)."""
    resume: bool = False
    """Continue the newest unfinished training run or sweep of `run_name` under the storage root
    (after its driver or the Ray head was lost) instead of starting a new one."""
    verbose: bool = False
    """Show Ray's own output too: every worker's and Serve replica's logs on the driver, Ray's INFO logs,
    Tune's trial table, Ray Data's progress bars and deprecation warnings. Off, a job prints its own
    progress (a line per trial-epoch, one per finished trial, data preparation), warnings and errors."""

    def __post_init__(self) -> None:
        require(is_identifier(self.run_name), "run_name",
                f"must be letters, digits, '-', '_' or '.', got {self.run_name!r}")


def is_identifier(name: str) -> bool:
    """Whether `name` is non-empty letters, digits, '-', '_' or '.' and not '.' or '..' (run, model, alias names)."""
    # Names become path components under the storage root: '.' and '..' would step outside their folder.
    return bool(name) and name not in (".", "..") and all(c.isalnum() or c in "-_." for c in name)


def _is_sampler(spec: Any) -> bool:
    return isinstance(spec, (list, tuple)) and len(spec) >= 1 and spec[0] in SAMPLERS


def iter_search_space(space: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """Yield (dotted path, sampler spec) for every leaf of a nested search space."""
    for key, value in space.items():
        path = f"{prefix}{key}"
        if value is None:  # a leaf set to null is not swept (YAML can only add to a mapping, not remove from it)
            continue
        if isinstance(value, dict):
            yield from iter_search_space(value, path + ".")
        else:
            yield path, value
