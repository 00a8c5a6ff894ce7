"""The one way to build a PipelineConfig.

Every source goes through `to_config`: a DictConfig Hydra composed (the jobs), a plain nested dict such
as the config a registry manifest stored, or an existing PipelineConfig with dotted overrides (a sweep
trial, the best trial's values, a distillation student). Each is merged onto the schema
(`OmegaConf.structured(PipelineConfig)`), so an unknown key or a value of the wrong type fails naming
the field; `OmegaConf.to_object` then builds the dataclasses (their `__post_init__` range checks run),
and `validate` checks the sections against each other.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from enum import Enum
from typing import Any, Dict, Iterator, Mapping, Optional, cast

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from orchestrator.config.schema import PipelineConfig
from orchestrator.config.validation import validate


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (`conf/config.yaml` extends `pipeline_schema`)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="pipeline_schema", node=PipelineConfig)


def to_config(source: Any = None, overrides: Optional[Mapping[str, Any]] = None) -> PipelineConfig:
    """A validated PipelineConfig from `source` (a composed DictConfig, a nested dict, a PipelineConfig,
    or None for the defaults) with `overrides` applied: dotted paths to values, e.g. {"train.lr": 0.01}.

    An override's value replaces what is at its path, a dict field included; a plain dict on a section
    (e.g. {"serve": {"port": 9000}}) sets only the fields it names. `source` is never modified.
    Raises ValueError naming the field: an unknown key (with the keys that exist there), a wrong type,
    a value out of range or two sections that do not fit together.
    """
    with _named_errors():
        node = cast(DictConfig, OmegaConf.merge(OmegaConf.structured(PipelineConfig), _as_source(source)))
        for path, value in (overrides or {}).items():
            OmegaConf.update(node, path, value, merge=isinstance(value, Mapping) and _is_section(node, path))
        cfg = cast(PipelineConfig, OmegaConf.to_object(node))
    validate(cfg)
    return cfg


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain, JSON- and YAML-friendly dict of a config dataclass (choices as their strings); `to_config`
    turns it back into the config."""
    return dataclasses.asdict(cfg, dict_factory=lambda items: {key: _plain(value) for key, value in items})


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _as_source(source: Any) -> Any:
    if source is None:
        return {}
    # A composed DictConfig is typed PipelineConfig already, and OmegaConf merges a node of the same type
    # without checking its keys: a Hydra `+foo=bar` would get through. As plain containers, it cannot.
    if isinstance(source, DictConfig):
        return OmegaConf.to_container(source, resolve=True)
    return source


def _is_section(node: DictConfig, path: str) -> bool:
    target = OmegaConf.select(node, path)
    return isinstance(target, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(target))


@contextmanager
def _named_errors() -> Iterator[None]:
    """OmegaConf's errors as one-line ValueErrors that start with the offending key."""
    try:
        yield
    except (ConfigKeyError, ConfigAttributeError) as err:
        raise ValueError(_unknown_key_message(err)) from None
    except OmegaConfBaseException as err:
        message = str(err.msg).splitlines()[0]  # the rest repeats the key and names OmegaConf's node types
        raise ValueError(f"{err.full_key}: {message}") from None


def _unknown_key_message(err: OmegaConfBaseException) -> str:
    key = err.full_key or str(err.key)
    parent = key.rpartition(".")[0]
    where = f"{parent} has" if parent else "the top-level keys are"
    known = [f.name for f in dataclasses.fields(err.object_type)] if dataclasses.is_dataclass(err.object_type) else []
    return f"{key} is not a config key: {where} {', '.join(known)}"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """Dotted overrides of a nested dict: {'train': {'lr': 0.1}} -> {'train.lr': 0.1}. Lists stay
    whole values; an empty dict adds no key."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
