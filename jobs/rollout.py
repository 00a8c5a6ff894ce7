"""Canary rollout of a running deployment through its admin API (needs an 'admin' API key).

    python -m jobs.rollout start 3 --percent 10       # version 3 (or an alias) gets 10% of digits' traffic
    python -m jobs.rollout status
    python -m jobs.rollout promote                    # the candidate becomes production
    python -m jobs.rollout rollback                   # drop the candidate, or return to the previous version

Options: --url (default http://127.0.0.1:8000), --model (default digits), --key (default $ORCHESTRATOR_API_KEY).
Prints the rollout state as one JSON line; exits 1 when the server refuses.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

from serve.serving import API_KEY_ENV, http_json


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.rollout", description="Canary rollout, promotion and rollback.")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the deployment")
    parser.add_argument("--model", default="digits", help="registry model name")
    parser.add_argument("--key", default=os.environ.get(API_KEY_ENV), help=f"admin API key (default ${API_KEY_ENV})")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="send a share of the traffic to a candidate version")
    start.add_argument("version", help="version number or alias")
    start.add_argument("--percent", type=float, default=10.0, help="share of traffic (0-100)")
    for name in ("status", "promote", "rollback"):
        commands.add_parser(name)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    url = f"{args.url.rstrip('/')}/admin/models/{args.model}"
    if args.command == "status":
        status, body = http_json("GET", f"{url}/rollout", api_key=args.key)
    elif args.command == "start":
        status, body = http_json("POST", f"{url}/rollout", {"version": args.version, "percent": args.percent}, api_key=args.key)
    else:
        status, body = http_json("POST", f"{url}/{args.command}", {}, api_key=args.key)
    print(json.dumps(body, default=str))
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
