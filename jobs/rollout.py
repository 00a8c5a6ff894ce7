"""Canary rollout of a running deployment through its admin API (needs an 'admin' API key).

    python -m jobs.rollout start 3 --percent 10       # version 3 (or an alias) gets 10% of digits' traffic
    python -m jobs.rollout start models:/digits@candidate    # any registry reference (digits:3, digits@candidate)
    python -m jobs.rollout status
    python -m jobs.rollout promote                    # the candidate becomes production
    python -m jobs.rollout rollback                   # drop the candidate, or return to the previous version

Prints the rollout state as one JSON line; exits 1 when the server refuses, 2 on a bad command line
(a malformed version reference included).
"""

import argparse
import json
import sys
from typing import List, Optional

from jobs._entry import Option, Tool, server_options
from orchestrator.client import http_json
from orchestrator.registry.refs import parse_ref

DEFAULT_MODEL = "digits"


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    model = Option("--model", None, "registry model name (or the model a version reference names)",
                   shown_default=DEFAULT_MODEL)
    tool = Tool("jobs.rollout", __doc__, [*server_options(scope="admin"), model])
    start = tool.command("start", "send a share of the model's traffic to a candidate version")
    start.add_argument("version", help="version number, alias or reference (models:/digits@candidate, digits:3)")
    start.add_argument("--percent", type=float, default=10.0, help="share of the traffic, 0-100 (default: %(default)s)")
    tool.command("status", "the split, the candidate's requests and errors, the verdict, recent events")
    tool.command("promote", "the candidate becomes production and takes all the traffic")
    tool.command("rollback", "drop the candidate, or return production to the previous version")
    return tool.parse(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        model = model_of(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    url = f"{args.url.rstrip('/')}/admin/models/{model}"
    if args.command == "status":
        status, body = http_json("GET", f"{url}/rollout", api_key=args.key)
    elif args.command == "start":
        start = {"version": args.version, "percent": args.percent}
        status, body = http_json("POST", f"{url}/rollout", start, api_key=args.key)
    else:
        status, body = http_json("POST", f"{url}/{args.command}", {}, api_key=args.key)
    print(json.dumps(body, default=str))
    return 0 if status == 200 else 1


def model_of(args: argparse.Namespace) -> str:
    """The model a command acts on: --model, or the one `start`'s version reference names (they must agree).
    Raises ValueError for a malformed reference or one naming another model than --model."""
    named = parse_ref(args.version).model if args.command == "start" else None
    if named and args.model and named != args.model:
        raise ValueError(f"version {args.version!r} names model {named!r}, but --model is {args.model!r}")
    return named or args.model or DEFAULT_MODEL


if __name__ == "__main__":
    sys.exit(main())
