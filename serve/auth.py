"""API keys with scopes, stored hashed on the storage root.

A key reads `orc_<id>_<secret>`. The store (JSON, one file on any fsspec URL) keeps, per id, the
key's name, scopes, times and the sha256 of the secret, never the secret itself. Clients send
`Authorization: Bearer <key>`. A missing or unknown key, or a revoked one, is 401; a valid key
without the route's scope is 403.

sha256 rather than a slow password hash: secrets are 256 random bits, so there is nothing to
brute-force, and a check per request must cost microseconds.

`api_key_for_deploy` decides which key a deployment hands its user (and creates the first one).
"""

import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from orchestrator.client import API_KEY_ENV
from orchestrator.config import PipelineConfig
from orchestrator.registry import storage
from serve.protocol import BadRequest

log = logging.getLogger(__name__)

SCOPES = ("infer", "admin")
KEY_PREFIX = "orc"


@dataclass(frozen=True, kw_only=True)
class ApiKey:
    """What the store knows about one key (everything but the secret)."""

    id: str
    """Public identifier, part of the key itself; `jobs.keys revoke <id>` names it."""
    name: str
    """Label given at creation (who or what uses the key)."""
    scopes: Tuple[str, ...]
    """Subset of SCOPES."""
    created_at: str
    """ISO-8601 UTC."""
    revoked_at: Optional[str] = None
    """ISO-8601 UTC, or None while the key is valid."""


def keys_url(root: str, configured: str = "") -> str:
    """Where the key store lives: `configured`, or <root>/serving/api_keys.json."""
    return configured or storage.join(root, "serving", "api_keys.json")


class KeyStore:
    """The hashed key store at `url`. Every change is a compare-and-swap of the whole file in a retry
    loop (`storage.update_json`: a lock file locally, conditional writes on S3), so admins and
    deployments creating or revoking keys at the same instant never lose each other's change."""

    def __init__(self, url: str):
        self.url = url

    def create(self, name: str, scopes: Sequence[str]) -> Tuple[str, ApiKey]:
        """A new key with `scopes`: (the key to hand out, its record). Raises ValueError for an
        unknown scope or an empty name."""
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be a non-empty subset of {list(SCOPES)}, got {list(scopes)}")
        if not name:
            raise ValueError("a key needs a name")
        key_id, secret = secrets.token_hex(4), secrets.token_urlsafe(32)
        record = ApiKey(id=key_id, name=name, scopes=tuple(s for s in SCOPES if s in scopes), created_at=_now())
        entry = {**asdict(record), "sha256": _digest(secret)}
        self._update(lambda entries: {**entries, key_id: entry})
        return f"{KEY_PREFIX}_{key_id}_{secret}", record

    def list(self) -> List[ApiKey]:
        """Every key ever created, revoked ones included, oldest first."""
        return sorted((_record(e) for e in self._entries().values()), key=lambda k: k.created_at)

    def revoke(self, key_id: str) -> ApiKey:
        """Revoke key `key_id` (its id or the full key). Raises KeyError when there is no such key."""
        key_id = parse_key(key_id)[0] if key_id.startswith(f"{KEY_PREFIX}_") else key_id
        revoked_at = _now()

        def with_revoked(entries: Dict[str, dict]) -> Dict[str, dict]:
            if key_id not in entries:
                raise KeyError(f"no API key with id {key_id!r} in {self.url}")
            entry = entries[key_id]
            return {**entries, key_id: {**entry, "revoked_at": entry["revoked_at"] or revoked_at}}

        return _record(self._update(with_revoked)[key_id])

    def has_active_keys(self) -> bool:
        return any(k.revoked_at is None for k in self.list())

    def snapshot(self) -> Dict[str, dict]:
        """The raw entries (hashes included) for an `Authenticator` to check keys against."""
        return self._entries()

    def _entries(self) -> Dict[str, dict]:
        if not storage.exists(self.url):
            return {}
        return json.loads(storage.read_bytes(self.url))["keys"]

    def _update(self, change: Callable[[Dict[str, dict]], Dict[str, dict]]) -> Dict[str, dict]:
        """Apply `change` to the entries without losing a concurrent writer's; returns the entries written.
        `change` may run more than once (on a fresh read each time), so it only computes."""
        document = storage.update_json(self.url, lambda current: {"keys": change((current or {"keys": {}})["keys"])})
        return document["keys"]


def parse_key(key: str) -> Tuple[str, str]:
    """(id, secret) of a key string; ValueError when it is not shaped like one."""
    prefix, _, rest = key.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or not key_id or not secret:
        raise ValueError("not an orchestrator API key")
    return key_id, secret


class Authenticator:
    """Checks bearer keys against a store, re-reading it at most every `ttl_s` seconds."""

    def __init__(self, store: KeyStore, ttl_s: float):
        self._store, self._ttl_s = store, ttl_s
        self._entries: Dict[str, dict] = {}
        self._read_at = -float("inf")

    def check(self, authorization: Optional[str], scope: str) -> ApiKey:
        """The key record behind an `Authorization` header value if it grants `scope`.

        Raises BadRequest 401 (no key, not a Bearer key, unknown, wrong secret, revoked) or 403
        (valid key without `scope`).
        """
        token = _bearer_token(authorization)
        try:
            key_id, secret = parse_key(token)
        except ValueError:
            raise _unauthorized("the API key is not valid") from None
        entry = self._current().get(key_id)
        if entry is None or not hmac.compare_digest(entry["sha256"], _digest(secret)):
            raise _unauthorized("the API key is not valid")
        if entry["revoked_at"] is not None:
            raise _unauthorized(f"the API key {key_id} was revoked at {entry['revoked_at']}")
        if scope not in entry["scopes"]:
            raise BadRequest(403, f"the API key {key_id} lacks the {scope!r} scope (it has {list(entry['scopes'])})")
        return _record(entry)

    def _current(self) -> Dict[str, dict]:
        if time.monotonic() - self._read_at >= self._ttl_s:
            self._entries = self._store.snapshot()
            self._read_at = time.monotonic()
        return self._entries


def api_key_for_deploy(cfg: PipelineConfig, *, mint: bool = True) -> Optional[str]:
    """The key a deployment reports: $ORCHESTRATOR_API_KEY if set; else, at first start (no
    active key in the store), a new key with every scope, printed once; else, when `mint`, a new
    'infer' key (the store keeps hashes only, so an older key cannot be handed back). None with
    auth off, after a warning."""
    if not cfg.serve.auth.enabled:
        log.warning("serve.auth.enabled=false: every model and admin route answers without an API key")
        return None
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    store = KeyStore(keys_url(cfg.storage.root, cfg.serve.auth.keys_url))
    if not store.has_active_keys():
        key, record = store.create("default", SCOPES)
        print(f"Created API key {record.id} with scopes {list(record.scopes)} "
              f"(shown once, stored hashed in {store.url}):\n"
              f"    {key}\nSend it as 'Authorization: Bearer <key>'. Manage keys with `python -m jobs.keys`.",
              file=sys.stderr, flush=True)
        return key
    if not mint:
        return None
    key, record = store.create(f"deploy:{cfg.serve.app_name}", ["infer"])
    log.info("created 'infer' API key %s for this deployment (revoke with `python -m jobs.keys revoke %s`)",
             record.id, record.id)
    return key


def _bearer_token(authorization: Optional[str]) -> str:
    if not authorization:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _unauthorized("the Authorization header must be 'Bearer <key>'")
    return token.strip()


def _unauthorized(message: str) -> BadRequest:
    return BadRequest(401, message, headers={"WWW-Authenticate": "Bearer"})


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _record(entry: dict) -> ApiKey:
    return ApiKey(id=entry["id"], name=entry["name"], scopes=tuple(entry["scopes"]), created_at=entry["created_at"],
                  revoked_at=entry["revoked_at"])


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()
