"""Training schedules as data: which stages train in which phase, for how long, at what learning rate.

`expand_schedule` turns a `ScheduleConfig` and a model's stage names into a list of `Phase`s that the
training loop runs in order. Whether a schedule fits a model's stages is checked by
`orchestrator.config.check_schedule` (before Ray starts for the built-in models, whose stage names the
config knows; here again for any model, once its stages are known); the planners below only plan.

Names used in a phase's `trainable`: the model's stage names, "head" (the model's own head) and
"aux" (an auxiliary head on the phase's output stage, used by greedy layer-wise training).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence, Tuple

from orchestrator.config import HEAD, PhaseConfig, ScheduleConfig, ScheduleKind, check_schedule, unfrozen_stages

AUX = "aux"


@dataclass(frozen=True, kw_only=True)
class Phase:
    """One phase of a schedule, resolved against a model's stages."""

    index: int
    """Position in the schedule (0-based)."""
    name: str
    """Readable label, e.g. 'stage:block1' or 'unfreeze:2'."""
    path: Tuple[str, ...]
    """Stages the phase's forward pass runs through, in order."""
    trainable: Tuple[str, ...]
    """Modules whose weights train: stage names from `path`, plus HEAD or AUX."""
    output: str
    """HEAD, or the last stage of `path` when an auxiliary head sits on it."""
    first_epoch: int
    """Global epoch (0-based) at which the phase starts."""
    epochs: int
    """Epochs the phase runs."""
    lr: Dict[str, float] = field(default_factory=dict)
    """Learning rate of each trainable module."""

    @property
    def end_epoch(self) -> int:
        return self.first_epoch + self.epochs

    @property
    def frozen_prefix(self) -> Tuple[str, ...]:
        """Leading stages of `path` below every trainable one: their outputs can be computed once."""
        trainable_stages = [i for i, name in enumerate(self.path) if name in self.trainable]
        return self.path[: trainable_stages[0]] if trainable_stages else self.path

    @property
    def suffix(self) -> Tuple[str, ...]:
        """Stages of `path` above the frozen prefix: run (and backpropagated through) every step."""
        return self.path[len(self.frozen_prefix):]

    def describe(self) -> Dict[str, object]:
        return {"phase": self.index, "name": self.name, "trainable": list(self.trainable), "epochs": self.epochs,
                "first_epoch": self.first_epoch, "lr": dict(self.lr)}


def expand_schedule(cfg: ScheduleConfig, stages: Sequence[str], *, epochs: int, lr: float) -> List[Phase]:
    """The phases of `cfg` for a model with `stages`, sharing `epochs` (train.epochs) unless
    `cfg.phase_epochs` sets each phase's length. Raises ValueError naming the offending field."""
    stages = list(stages)
    check_schedule(cfg, stages, epochs=epochs)
    plans = _PLANNERS[cfg.kind](cfg, stages)
    lengths = _phase_lengths(cfg, len(plans), epochs)
    phases, start = [], 0
    for index, ((name, path, trainable, output, rates), length) in enumerate(zip(plans, lengths)):
        phase_lr = {module: lr * rates.get(module, 1.0) * (cfg.head_lr_scale if module in (HEAD, AUX) else 1.0)
                    for module in trainable}
        phases.append(Phase(index=index, name=name, path=tuple(path), trainable=tuple(trainable), output=output,
                            first_epoch=start, epochs=length, lr=phase_lr))
        start += length
    return phases


def schedule_epochs(cfg: ScheduleConfig, epochs: int) -> int:
    """How many epochs the schedule runs in all: train.epochs unless the phases' lengths are given."""
    if cfg.kind == ScheduleKind.custom:
        return sum(p.epochs for p in cfg.phases)
    return sum(cfg.phase_epochs) if cfg.phase_epochs else epochs


def _phase_lengths(cfg: ScheduleConfig, count: int, epochs: int) -> List[int]:
    # check_schedule has made sure the lengths given match `count`, or that `epochs` covers it.
    if cfg.kind == ScheduleKind.custom:
        return [p.epochs for p in cfg.phases]
    if cfg.phase_epochs:
        return list(cfg.phase_epochs)
    base, extra = divmod(epochs, count)
    return [base + (1 if i >= count - extra else 0) for i in range(count)]


def _decayed(stages: Sequence[str], decay: float, scale: float = 1.0) -> Dict[str, float]:
    """Learning-rate multipliers: the head at `scale`, each stage `decay` times its upper neighbour."""
    rates = {HEAD: scale}
    for depth, name in enumerate(reversed(list(stages)), start=1):
        rates[name] = scale * decay**depth
    return rates


def _end_to_end(cfg: ScheduleConfig, stages: List[str]) -> list:
    return [("end_to_end", stages, [*stages, HEAD], HEAD, {})]


def _layerwise(cfg: ScheduleConfig, stages: List[str]) -> list:
    plans: list = []
    for k, name in enumerate(stages):
        last = k == len(stages) - 1
        # The top stage trains under the model's own head: its auxiliary head would be the head itself.
        plans.append((f"stage:{name}", stages[: k + 1], [name, HEAD if last else AUX], HEAD if last else name, {}))
    if cfg.finetune:
        plans.append(("finetune", stages, [*stages, HEAD], HEAD, _decayed(stages, cfg.lr_decay, cfg.finetune_lr_scale)))
    return plans


def _gradual_unfreeze(cfg: ScheduleConfig, stages: List[str]) -> list:
    plans: list = []
    for unfrozen in range(unfrozen_stages(cfg, stages) + 1):
        top = stages[len(stages) - unfrozen:]
        rates = _decayed(top, cfg.lr_decay)
        plans.append((f"unfreeze:{unfrozen}", stages, [*top, HEAD], HEAD, rates))
    return plans


def _linear_probe(cfg: ScheduleConfig, stages: List[str]) -> list:
    # Every stage frozen: the whole body is the prefix (computed once per phase when cached), the head trains.
    return [("linear_probe", stages, [HEAD], HEAD, {})]


def _custom(cfg: ScheduleConfig, stages: List[str]) -> list:
    return [_custom_phase(i, phase, stages) for i, phase in enumerate(cfg.phases)]


def _custom_phase(index: int, phase: PhaseConfig, stages: List[str]) -> tuple:
    # check_custom_phase has made sure every name is a stage at or below the output, or HEAD.
    path = stages if phase.output == HEAD else stages[: stages.index(phase.output) + 1]
    named = [*stages, HEAD] if phase.trainable == ["*"] else list(phase.trainable)
    top = AUX if phase.output != HEAD else HEAD
    trainable = [n for n in path if n in named] + ([top] if HEAD in named or top == AUX else [])
    rates = {n: phase.lr_scale * phase.stage_lr_scale.get(n, 1.0) for n in trainable}
    return (f"custom:{index}", path, trainable, phase.output, rates)


_PLANNERS = {
    ScheduleKind.end_to_end: _end_to_end,
    ScheduleKind.layerwise: _layerwise,
    ScheduleKind.gradual_unfreeze: _gradual_unfreeze,
    ScheduleKind.linear_probe: _linear_probe,
    ScheduleKind.custom: _custom,
}
