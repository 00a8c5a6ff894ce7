"""Inspect and edit the model registry: list, show and compare versions, move aliases, tag versions.

    python -m jobs.registry list                                 # models: versions, latest, aliases
    python -m jobs.registry list digits                          # its versions: aliases, created, metrics, tags
    python -m jobs.registry show digits@production               # the manifest, and where its training curves are
    python -m jobs.registry diff digits:3 digits:4               # metrics, config, lineage, signature, weights
    python -m jobs.registry alias digits:4 production            # point production at version 4
    python -m jobs.registry alias --delete digits candidate      # remove an alias
    python -m jobs.registry tag digits:4 owner=ml reviewed=yes   # set tags (--remove KEY drops one)
    python -m jobs.registry list digits --json                   # JSON instead of a table
    python -m jobs.registry list --root s3://bucket/orchestrator # default: file://./runs

A version is any reference: models:/digits@production, models:/digits/3, digits:3, digits@production, or
a bare number, alias or 'latest' with --model. Tags live beside the manifest (tags.json), which stays as
registered. Exits 1 with one line on stderr for an unknown model, version or alias or a malformed
reference, 2 on a bad command line.
"""

import argparse
import datetime as dt
import json
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

from jobs._entry import Option, Tool, root_option
from orchestrator.config import EncryptionConfig, StorageConfig, flatten
from orchestrator.config.schema import TASK_HEADLINE
from orchestrator.registry import ModelRegistry, ModelVersion, RegistryError, storage
from orchestrator.registry.curves import CURVES_FILE

Row = Dict[str, Any]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    model = Option("--model", None, "model of a bare version number or alias", shown_default="named by the reference")
    as_json = Option("--json", None, "print JSON (one document on one line) instead of a table", switch=True)
    tool = Tool("jobs.registry", __doc__, [root_option(), model, as_json])
    listing = tool.command("list", "models, or the versions of one model")
    listing.add_argument("name", nargs="?", metavar="MODEL", help="list this model's versions")
    show = tool.command("show", "a version's manifest, aliases, tags and training curves")
    show.add_argument("ref", metavar="REF", help="the version")
    diff = tool.command("diff", "how two versions differ: metrics, config, lineage, signature, weights")
    diff.add_argument("refs", nargs=2, metavar="REF", help="the versions (a bare second one: of the first's model)")
    alias = tool.command("alias", "point an alias at a version, or delete it (--delete MODEL NAME)")
    alias.add_argument("target", metavar="REF|MODEL", help="the version (with --delete: the model)")
    alias.add_argument("alias", metavar="NAME", help="the alias")
    alias.add_argument("--delete", action="store_true", help="remove the alias instead")
    tag = tool.command("tag", "set or remove tags of a version; prints all its tags")
    tag.add_argument("ref", metavar="REF", help="the version")
    tag.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="tags to set")
    tag.add_argument("--remove", action="append", default=[], metavar="KEY", help="a tag to remove; repeatable")
    rekey = tool.command("rekey", "re-wrap every encrypted version's data key under a new master key "
                                  "(weights and manifests stay as they are)")
    rekey.add_argument("--old-env", default="ORCHESTRATOR_MASTER_KEY", metavar="VAR",
                       help="environment variable holding the current master key (default: %(default)s)")
    rekey.add_argument("--new-env", required=True, metavar="VAR",
                       help="environment variable holding the new master key (base64 of 32 bytes)")
    args = tool.parse(argv)
    if args.command == "tag":
        bad = [p for p in args.pairs if "=" not in p]
        if bad:
            tool.parser.error(f"tags are KEY=VALUE, got {bad}")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    registry = ModelRegistry(StorageConfig(root=args.root).root)
    command = {"list": list_command, "show": show_command, "diff": diff_command, "alias": alias_command,
               "tag": tag_command, "rekey": rekey_command}[args.command]
    try:
        result, text = command(registry, args)
    except RegistryError as err:  # IntegrityError too: a tampered file is named, never shown
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(result, default=str) if args.json else text)
    return 0


def version_of(registry: ModelRegistry, ref: str, model: Optional[str]) -> ModelVersion:
    """The version `ref` names, bare numbers and aliases being of `model`."""
    return registry.get(model, ref) if model else registry.get(ref)


def existing_model(registry: ModelRegistry, name: str) -> List[int]:
    """The versions of model `name`; RegistryError when it has none."""
    versions = registry.versions(name)
    if not versions:
        raise RegistryError(f"no model {name!r} in {registry.url} (models: {registry.models()})")
    return versions


def list_command(registry: ModelRegistry, args: argparse.Namespace) -> Tuple[Any, str]:
    if args.name is None:
        models = [model_row(registry, name) for name in registry.models() if registry.versions(name)]
        return models, table(models, ["model", "versions", "latest", "aliases"]) if models else "no models"
    rows = [version_row(registry, registry.get(args.name, n)) for n in existing_model(registry, args.name)]
    metric_names = sorted({k for row in rows for k in row["metrics"]})
    flat = [{**{k: v for k, v in row.items() if k != "metrics"}, **row["metrics"]} for row in rows]
    return rows, table(flat, ["version", "aliases", "created", "variant", *metric_names, "tags"])


def model_row(registry: ModelRegistry, name: str) -> Row:
    versions = registry.versions(name)
    return {"model": name, "versions": len(versions), "latest": versions[-1], "aliases": registry.aliases(name)}


def version_row(registry: ModelRegistry, version: ModelVersion) -> Row:
    """A version as `list MODEL` shows it: aliases, creation time, its variant's method, headline metrics, tags."""
    return {"version": version.version, "aliases": aliases_of(registry, version), "created": created(version),
            "variant": (version.manifest.get("variant") or {}).get("method"), "metrics": headline(version),
            "tags": registry.tags(version.model, version.version)}


def aliases_of(registry: ModelRegistry, version: ModelVersion) -> List[str]:
    return sorted(a for a, n in registry.aliases(version.model).items() if n == version.version)


def headline(version: ModelVersion) -> Dict[str, float]:
    """The task's headline metrics of the val and test splits the manifest records (rounded)."""
    task = version.signature.get("task", "classification")
    keys = [f"{split}_{name}" for split in ("val", "test") for name in TASK_HEADLINE.get(task, ())]
    return {k: round(float(version.metrics[k]), 4) for k in keys if k in version.metrics}


def created(version: ModelVersion) -> str:
    """The registration time in UTC, to the second."""
    stamp = version.manifest.get("created_at")
    if not stamp:
        return ""
    return dt.datetime.fromisoformat(stamp).astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def show_command(registry: ModelRegistry, args: argparse.Namespace) -> Tuple[Any, str]:
    version = version_of(registry, args.ref, args.model)
    curves = storage.join(version.url, CURVES_FILE) if CURVES_FILE in version.manifest["files"] else None
    result = {"model": version.model, "version": version.version, "url": version.url,
              "aliases": aliases_of(registry, version), "tags": registry.tags(version.model, version.version),
              "training_curves": curves, "manifest": version.manifest}
    return result, show_text(result)


def show_text(shown: Row) -> str:
    """The manifest as YAML (the per-epoch history as a count: the PNG draws it, --json holds it)."""
    import yaml  # PyYAML comes with Hydra and OmegaConf

    manifest = json.loads(json.dumps(shown["manifest"], default=str))
    history = manifest.get("metrics", {}).get("history")
    if isinstance(history, list):
        manifest["metrics"]["history"] = f"{len(history)} epochs (--json for each)"
    head = [f"{shown['model']} v{shown['version']}   aliases: {', '.join(shown['aliases']) or '-'}",
            f"url: {shown['url']}",
            f"training curves: {shown['training_curves'] or 'none registered'}",
            f"tags: {_pairs(shown['tags']) or '-'}"]
    return "\n".join(head) + "\n" + yaml.dump(manifest, Dumper=_show_dumper(), sort_keys=True, width=120).rstrip()


def _show_dumper() -> type:
    import yaml  # PyYAML comes with Hydra and OmegaConf

    class ShowDumper(yaml.SafeDumper):
        """Block style, except lists of plain values (shapes, dims) on one line."""

    def represent_list(dumper: yaml.SafeDumper, value: list) -> yaml.Node:
        flat = all(not isinstance(v, (dict, list)) for v in value)
        return dumper.represent_sequence("tag:yaml.org,2002:seq", value, flow_style=flat)

    ShowDumper.add_representer(list, represent_list)
    return ShowDumper


def diff_command(registry: ModelRegistry, args: argparse.Namespace) -> Tuple[Any, str]:
    first = version_of(registry, args.refs[0], args.model)
    second = version_of(registry, args.refs[1], args.model or first.model)
    result = diff_versions(first, second)
    return result, diff_text(result)


def diff_versions(a: ModelVersion, b: ModelVersion) -> Row:
    """{"a", "b", "metrics", "config", "lineage", "signature", "weights", "files"}: each section only what
    differs, as {key: {"a", "b"}} (metrics with "delta" = b - a where both are numbers)."""
    metrics = changed(_without_history(a.metrics), _without_history(b.metrics))
    for values in metrics.values():
        if all(isinstance(values[s], (int, float)) and not isinstance(values[s], bool) for s in "ab"):
            values["delta"] = values["b"] - values["a"]
    return {
        "a": f"models:/{a.model}/{a.version}", "b": f"models:/{b.model}/{b.version}",
        "metrics": metrics,
        "config": changed(a.manifest.get("config", {}), b.manifest.get("config", {})),
        "lineage": changed(a.manifest.get("lineage", {}), b.manifest.get("lineage", {})),
        "signature": changed(a.signature, b.signature),
        "weights": {"a": a.weights_sha256, "b": b.weights_sha256, "same": a.weights_sha256 == b.weights_sha256,
                    "format": changed(a.manifest.get("weights", {}), b.manifest.get("weights", {}))},
        "files": changed({n: a.manifest["files"][n] for n in a.extra_files},
                         {n: b.manifest["files"][n] for n in b.extra_files}),
    }


def changed(a: Dict[str, Any], b: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{dotted key: {"a", "b"}} of the leaves of two nested dicts that differ (a missing side is None)."""
    flat_a, flat_b = flatten(a), flatten(b)
    return {k: {"a": flat_a.get(k), "b": flat_b.get(k)} for k in sorted(set(flat_a) | set(flat_b))
            if flat_a.get(k) != flat_b.get(k)}


def diff_text(d: Row) -> str:
    lines = [f"a = {d['a']}", f"b = {d['b']}", ""]
    weights = d["weights"]
    lines.append("weights: identical" if weights["same"] else
                 f"weights: differ  a sha256 {weights['a'][:16]}  b sha256 {weights['b'][:16]}")
    sections: Sequence[Tuple[str, Dict[str, Any]]] = [
        ("weights format", weights["format"]), ("metrics", d["metrics"]), ("signature", d["signature"]),
        ("config", d["config"]), ("lineage", d["lineage"]), ("files (sha256)", d["files"])]
    for title, section in sections:
        if section:
            columns = ["key", "a", "b", *(["delta"] if any("delta" in v for v in section.values()) else [])]
            rows = [{"key": k, **{c: _short(v.get(c)) for c in columns[1:]}} for k, v in section.items()]
            lines += ["", f"{title}:", table(rows, columns)]
    same = [title for title, section in sections if not section]
    if same:
        lines += ["", f"same: {', '.join(same)}"]
    return "\n".join(lines)


def alias_command(registry: ModelRegistry, args: argparse.Namespace) -> Tuple[Any, str]:
    if args.delete:
        existing_model(registry, args.target)
        number = registry.delete_alias(args.target, args.alias)
        result = {"model": args.target, "alias": args.alias, "deleted": True, "version": number}
        return result, f"deleted {args.target}@{args.alias} (was v{number})"
    version = version_of(registry, args.target, args.model)
    previous = registry.aliases(version.model).get(args.alias)
    registry.set_alias(version.model, args.alias, version.version)
    result = {"model": version.model, "alias": args.alias, "version": version.version, "previous": previous}
    was = f"v{previous}" if previous is not None else "unset"
    return result, f"{version.model}@{args.alias} -> v{version.version} (was {was})"


def tag_command(registry: ModelRegistry, args: argparse.Namespace) -> Tuple[Any, str]:
    version = version_of(registry, args.ref, args.model)
    pairs = dict(p.split("=", 1) for p in args.pairs)
    tags = (registry.set_tags(version.model, version.version, pairs, remove=args.remove)
            if pairs or args.remove else registry.tags(version.model, version.version))
    result = {"model": version.model, "version": version.version, "tags": tags}
    return result, f"{version.model} v{version.version} tags: {_pairs(tags) or '-'}"


def rekey_command(registry: ModelRegistry, args: argparse.Namespace) -> Tuple[Any, str]:
    from orchestrator.registry.crypto import MasterKey, rotate_master_key

    old, new = (MasterKey.from_config(EncryptionConfig(key_env=var)) for var in (args.old_env, args.new_env))
    rewrapped = rotate_master_key(StorageConfig(root=args.root).root, old, new)
    result = {"rewrapped": [{"model": m, "version": v} for m, v in rewrapped]}
    return result, f"re-wrapped {len(rewrapped)} versions' data keys under ${args.new_env}: " + (
        ", ".join(f"{m} v{v}" for m, v in rewrapped) or "none needed it")


def table(rows: List[Row], columns: Sequence[str]) -> str:
    """`rows` as a left-aligned text table of `columns` (lists, dicts and None shown compactly)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return _pairs(value) or "-"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "-"
    return str(value)


def _pairs(mapping: Dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in mapping.items())


def _short(value: Any, limit: int = 60) -> Any:
    """A value for a table cell: floats to 6 significant digits, long text cut."""
    if isinstance(value, float):
        return f"{value:.6g}"
    text = json.dumps(value, default=str) if isinstance(value, (dict, list)) else value
    return text[: limit - 3] + "..." if isinstance(text, str) and len(text) > limit else text


def _without_history(metrics: Dict[str, Any]) -> Dict[str, Any]:
    # Per-epoch lists differ whenever training does; the curves PNG and `show --json` hold them.
    return {k: v for k, v in metrics.items() if k != "history"}


if __name__ == "__main__":
    sys.exit(main())
