"""Tasks: what a model learns, as data the loop never branches on.

A `Task` owns everything that differs between, say, classifying feature rows and predicting the next
token: how a Ray Data batch becomes (inputs, targets), the training loss, the evaluation sums and the
metrics made from them, which metric selects the best checkpoint, and what the registry records as
the version's signature. The loop (orchestrator.training.loop), the parallel plans and the sweep only
call these methods, so a new task (regression, sequence classification) is one more class here and
one more `task.name` choice, not a change to the loop.

  classification   batches {'x': float32 [B, F], 'y': int64 [B]}; cross-entropy; accuracy.
  causal_lm        batches {'tokens': int [B, T+1], 'nbytes': int [B]}; inputs tokens[:, :-1], targets
                   tokens[:, 1:], padding (id 0) ignored; loss (nats per token), perplexity and bits per
                   byte (the nats of every predicted token over the raw bytes they stand for).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from orchestrator.config.schema import TASK_HEADLINE, TASK_METRICS

PAD_ID = 0
"""Token id of padding in language-model blocks (orchestrator.training.text); targets equal to it are ignored."""


class Task:
    """The interface every task implements."""

    name: str
    selection_metric: str
    """Reported metric that picks the best checkpoint of a run."""
    selection_mode: str
    """'max' or 'min' for `selection_metric`."""
    metric_names: Tuple[str, ...]
    """Every per-epoch metric the task reports (each also exists with a 'val_' prefix)."""
    headline: Tuple[str, ...]
    """Metrics (without split prefix) a job's summary line shows for each evaluated split."""

    def batch(self, batch: Dict[str, torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of one Ray Data batch, on `device`."""
        raise NotImplementedError

    padded: bool
    """Whether batches hold padding, so the predictions counted vary from batch to batch (and rank to rank)."""

    def loss_sum(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Training loss summed over a batch's counted predictions; a plan divides it by the count over every
        rank, so the gradient is the mean over the whole global batch wherever the padding falls."""
        raise NotImplementedError

    def counted(self, targets: torch.Tensor) -> torch.Tensor:
        """How many predictions of `targets` the loss sums over (rows, or tokens that are not padding)."""
        raise NotImplementedError

    def eval_sums(self, outputs: torch.Tensor, targets: torch.Tensor, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Float64 sums over a batch that `metrics` turns into metrics (summed over batches and ranks first)."""
        raise NotImplementedError

    def zero_sums(self) -> torch.Tensor:
        """`eval_sums` of no batch at all."""
        return torch.zeros(3, dtype=torch.float64)

    def metrics(self, sums: torch.Tensor, prefix: str) -> Dict[str, float]:
        """Metrics from the summed `eval_sums`, each named `<prefix><metric>`."""
        raise NotImplementedError

    def signature(self, info: Any) -> Dict[str, Any]:
        """What the registry records about a version's inputs and outputs (from the dataset's DatasetInfo)."""
        raise NotImplementedError


class Classification(Task):
    name = "classification"
    selection_metric = "val_accuracy"
    selection_mode = "max"
    metric_names = TASK_METRICS["classification"]
    headline = TASK_HEADLINE["classification"]

    def batch(self, batch, device):
        return batch["x"].to(device), batch["y"].to(device)

    padded = False

    def loss_sum(self, outputs, targets):
        return nn.functional.cross_entropy(outputs.float(), targets, reduction="sum")

    def counted(self, targets):
        return torch.tensor(float(len(targets)), device=targets.device)

    def eval_sums(self, outputs, targets, batch):
        loss_sum = nn.functional.cross_entropy(outputs.float(), targets, reduction="sum")
        correct = (outputs.argmax(dim=1) == targets).sum()
        return torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(len(targets)), dtype=torch.float64,
                                                                              device=outputs.device)]).cpu()

    def metrics(self, sums, prefix):
        loss_sum, correct, count = (float(v) for v in sums)
        return {f"{prefix}loss": loss_sum / max(count, 1.0), f"{prefix}accuracy": correct / max(count, 1.0)}

    def signature(self, info):
        from orchestrator.registry.store import signature_for, text_signature_for

        if info.kind == "labeled_text":  # rows of token ids: the served input is the text itself
            return text_signature_for(info.context, info.num_classes, info.class_names)
        return signature_for(info.input_shape, info.num_classes)


class CausalLM(Task):
    name = "causal_lm"
    selection_metric = "val_loss"
    selection_mode = "min"
    metric_names = TASK_METRICS["causal_lm"]
    headline = TASK_HEADLINE["causal_lm"]

    def batch(self, batch, device):
        tokens = batch["tokens"].to(device=device, dtype=torch.long)
        return tokens[:, :-1], tokens[:, 1:]

    padded = True

    def loss_sum(self, outputs, targets):
        return nn.functional.cross_entropy(
            outputs.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID, reduction="sum"
        )

    def counted(self, targets):
        return (targets != PAD_ID).sum().float()

    def eval_sums(self, outputs, targets, batch):
        nats = nn.functional.cross_entropy(
            outputs.float().flatten(0, 1), targets.flatten(), ignore_index=PAD_ID, reduction="sum"
        )
        tokens = (targets != PAD_ID).sum()
        nbytes = batch["nbytes"].sum()
        return torch.stack([nats.double().cpu(), tokens.double().cpu(), nbytes.double().cpu()])

    def metrics(self, sums, prefix):
        nats, tokens, nbytes = (float(v) for v in sums)
        loss = nats / max(tokens, 1.0)
        return {
            f"{prefix}loss": loss,
            f"{prefix}perplexity": math.exp(min(loss, 50.0)),
            f"{prefix}bits_per_byte": nats / math.log(2) / max(nbytes, 1.0),
            f"{prefix}tokens": tokens,
        }

    def signature(self, info):
        return {
            "task": self.name,
            "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, info.vocab_size]}],
            "input_shape": [info.context],
            "num_classes": info.vocab_size,
            "context": info.context,
            "vocab_size": info.vocab_size,
            "tokenizer": info.tokenizer,
        }


TASKS: Dict[str, Task] = {task.name: task for task in (Classification(), CausalLM())}


def get_task(name: Any) -> Task:
    """The task called `name` (a `task.name` value)."""
    return TASKS[str(name)]


def headline_metrics(task: Task, metrics: Dict[str, Any], splits: Tuple[str, ...] = ("val",)) -> Dict[str, float]:
    """The task's headline metrics of `splits` found in `metrics`, rounded for a summary line."""
    keys = [f"{split}_{name}" for split in splits for name in task.headline]
    return {key: round(float(metrics[key]), 4) for key in keys if key in metrics}


def reported_metrics(task: Task) -> List[str]:
    """Per-epoch metric names a run of `task` reports besides the loop's own (epoch, train_loss, ...)."""
    return [f"val_{name}" for name in task.metric_names]
