"""Create, list and revoke serving API keys (stored hashed under the storage root).

    python -m jobs.keys create ci-bot --scope infer            # prints the key once
    python -m jobs.keys create ops --scope infer --scope admin
    python -m jobs.keys list
    python -m jobs.keys revoke <id>
    python -m jobs.keys list --root s3://bucket/orchestrator   # default: file://./runs

Running deployments notice a change within serve.auth.cache_ttl_s (1 s by default).
Prints one JSON line per key; exits 1 when revoke finds no such key, 2 on a bad command line.
"""

import argparse
import dataclasses
import json
import sys
from typing import List, Optional

from jobs._entry import Option, Tool, root_option
from orchestrator.config import StorageConfig
from serve.auth import SCOPES, KeyStore, keys_url


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    keys_url_option = Option("--keys-url", "", "key store URL, when the deployment sets serve.auth.keys_url",
                             shown_default="under --root", metavar="URL")
    tool = Tool("jobs.keys", __doc__, [root_option(), keys_url_option])
    create = tool.command("create", "create a key and print it (only this once)")
    create.add_argument("name", help="who or what uses the key")
    create.add_argument("--scope", action="append", choices=SCOPES, dest="scopes",
                        help="a scope of the key; repeat for several (default: infer)")
    tool.command("list", "list keys: ids, names, scopes, times; never their secrets")
    revoke = tool.command("revoke", "revoke a key by id")
    revoke.add_argument("id", help="the key's id (or the key itself)")
    return tool.parse(argv)


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
