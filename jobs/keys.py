"""Create, list and revoke serving API keys (stored hashed under the storage root).

    python -m jobs.keys create ci-bot --scope infer            # prints the key once
    python -m jobs.keys create ops --scope infer --scope admin
    python -m jobs.keys list
    python -m jobs.keys revoke <id>
    python -m jobs.keys list --root s3://bucket/orchestrator   # default: file://./runs

Running deployments notice a change within serve.auth.cache_ttl_s (1 s by default).
"""

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from serve.auth import SCOPES, KeyStore, keys_url
from orchestrator.config.schema import StorageConfig


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.keys", description="Manage serving API keys.")
    parser.add_argument("--root", default=StorageConfig().root, help="storage root (storage.root of the deployment)")
    parser.add_argument("--keys-url", default="", help="key store URL when serve.auth.keys_url is set")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("create", help="create a key and print it (once)")
    create.add_argument("name", help="who or what uses the key")
    create.add_argument("--scope", action="append", choices=SCOPES, dest="scopes", help="repeat for several; default: infer")
    commands.add_parser("list", help="list keys (never their secrets)")
    revoke = commands.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", help="the key's id (or the key itself)")
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    store = KeyStore(keys_url(StorageConfig(root=args.root).root, args.keys_url))
    if args.command == "create":
        key, record = store.create(args.name, args.scopes or ["infer"])
        print(json.dumps({"api_key": key, **dataclasses.asdict(record)}))
    elif args.command == "list":
        for record in store.list():
            print(json.dumps(dataclasses.asdict(record)))
    else:
        try:
            print(json.dumps(dataclasses.asdict(store.revoke(args.id))))
        except KeyError as err:
            print(err.args[0], file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
