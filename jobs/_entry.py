"""What every entrypoint in `jobs/` shares, written once.

A Hydra job is a plain function `run(cfg) -> summary` plus `main = hydra_job(run)`. The wrapper
composes `conf/` (an installed package, so a wheel runs from any folder), turns the DictConfig into the
typed `PipelineConfig` (a bad override fails there, before Ray starts), connects to Ray when the job
needs it, and prints the summary as one JSON line: the job's result, the last line scripts and tests
read. Exit codes are Hydra's: 0 when `run` returns, 1 when composing, checking or running raises.

The tools without Hydra (`jobs.keys`, `jobs.rollout`, `jobs.registry`) are a `Tool` (argparse, one command per verb)
built from the options below, so `--root`, `--url` and `--key` mean the same in each.
"""

import argparse
import dataclasses
import functools
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence

from orchestrator.client import API_KEY_ENV
from orchestrator.config import PipelineConfig, StorageConfig, register_configs, to_config

Summary = Dict[str, Any]
"""A job's result: printed as its final JSON line."""


def always(cfg: PipelineConfig) -> bool:
    """`needs_ray` of most jobs."""
    return True


def never(cfg: PipelineConfig) -> bool:
    """`needs_ray` of a job that only writes files (jobs.export)."""
    return False


def hydra_job(run: Callable[[PipelineConfig], Summary], *, check: Optional[Callable[[PipelineConfig], object]] = None,
              needs_ray: Callable[[PipelineConfig], bool] = always, serves: bool = False) -> Callable[[], None]:
    """`run` as a Hydra main on `conf/config.yaml`: `main = hydra_job(run)`, then `main()` when run as a script.

    check: called with the config before Ray starts (its result is ignored); raise to refuse the config.
    needs_ray: whether this config needs a connected Ray for `run`; without it, Ray (and torch) are not
        even imported.
    serves: `run` leaves a Serve app up: the summary is printed while Ray is connected, then with
        `serve.block` the job serves until Ctrl-C or SIGTERM (`ray job stop`); a multirun (`-m`) with
        `serve.block=true` is refused before Ray starts, since its first job would never return.

    Under a multirun, every job connects to Ray (an embedded one starts and stops with each job) and
    prints its own summary line.
    """
    import hydra  # here, not above: jobs.keys and jobs.rollout need none of it

    register_configs()  # conf/config.yaml extends the schemas stored here

    @hydra.main(config_path="pkg://conf", config_name="config", version_base="1.3")
    @functools.wraps(run)  # Hydra names the job after the function it unwraps to: jobs/<verb>.py's `run`
    def main(dcfg: Any) -> None:
        cfg = to_config(dcfg)
        if serves and cfg.serve.block and needs_ray(cfg) and is_multirun():
            raise SystemExit(MULTIRUN_BLOCKS)
        if check is not None:
            check(cfg)
        if not needs_ray(cfg):
            print_summary(run(cfg))
            return
        from orchestrator.flows import connected, serve_until_interrupted  # loads torch and Ray

        with connected(cfg):
            summary = run(cfg)
            if serves:
                print_summary(summary)
                if cfg.serve.block:
                    serve_until_interrupted(cfg)
                return
        print_summary(summary)  # after an embedded Ray has stopped: nothing of it prints below this line

    return main


MULTIRUN_BLOCKS = ("serve.block=true cannot run under Hydra multirun (-m): the first job would serve until "
                   "interrupted and the others would never run. Add serve.block=false: each job then deploys, "
                   "checks its endpoint and exits.")


def is_multirun() -> bool:
    """Whether this Hydra job is one of a multirun's (`-m`): jobs run one after another in this process."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def print_summary(summary: Summary) -> None:
    """One JSON line on stdout: what scripts and tests read."""
    print(json.dumps(summary, default=str), flush=True)


@dataclasses.dataclass(frozen=True)
class Option:
    """An option of a tool, accepted before or after its command (`--key K status` and `status --key K`)."""

    flag: str
    """e.g. "--root"."""
    default: Optional[str]
    """Its value when not given."""
    help: str
    """One line for --help."""
    shown_default: Optional[str] = None
    """What --help shows as the default, when not the value itself (a secret's source)."""
    metavar: Optional[str] = None
    """The value's name in --help."""
    switch: bool = False
    """A flag without a value (e.g. --json): False unless given; `default` is ignored."""


def root_option() -> Option:
    """--root: the storage root, as `storage.root` of the jobs."""
    return Option("--root", StorageConfig().root, "storage root, the storage.root of the deployment", metavar="URL")


def server_options(scope: str) -> List[Option]:
    """--url and --key: a running deployment, and the API key with `scope` sent to it."""
    return [Option("--url", "http://127.0.0.1:8000", "base URL of the deployment"),
            Option("--key", os.environ.get(API_KEY_ENV), f"API key with the '{scope}' scope",
                   shown_default=f"${API_KEY_ENV}", metavar="API_KEY")]


class Tool:
    """The argparse CLI of a tool `python -m <prog>` made of commands: its module docstring's first line
    is the description, the rest (usage examples) the epilog of --help. Exit code 2 on a bad command line."""

    def __init__(self, prog: str, doc: str, options: Sequence[Option]) -> None:
        description, _, examples = doc.strip().partition("\n")
        self.parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=description,
                                              epilog=examples.strip("\n"),
                                              formatter_class=argparse.RawDescriptionHelpFormatter)
        # The same options after the command; SUPPRESS leaves one given before it (or its default) when absent.
        self._after_command = argparse.ArgumentParser(add_help=False)
        for option in options:
            shown = str(option.default if option.shown_default is None else option.shown_default)
            shown = shown.replace("%", "%%")  # argparse %-formats help strings
            kind: Dict[str, Any] = {"action": "store_true"} if option.switch else {"metavar": option.metavar}
            self.parser.add_argument(option.flag, default=False if option.switch else option.default,
                                     help=option.help if option.switch else f"{option.help} (default: {shown})",
                                     **kind)
            self._after_command.add_argument(option.flag, default=argparse.SUPPRESS, help=option.help, **kind)
        self._commands = self.parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(self, name: str, help: str) -> argparse.ArgumentParser:
        """Add the command `name`; returns its parser, for its own arguments."""
        return self._commands.add_parser(name, help=help, description=help, parents=[self._after_command])

    def parse(self, argv: Optional[Sequence[str]]) -> argparse.Namespace:
        """The parsed command line (`argv`, or sys.argv's when None); `.command` names the command."""
        return self.parser.parse_args(argv)
