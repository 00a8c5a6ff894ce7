"""Concurrent writers on S3 lose nothing: the races of tests/unit/test_concurrent_writers.py against
the S3-compatible server (tests/s3_server.py), where conditional PUTs (If-None-Match, If-Match) keep
writers apart. Threads rather than processes: the guarantee lives in the server, and this process may
hold a Ray driver, which must not fork. Objects are checked with boto3, not through s3fs."""

from __future__ import annotations

import json
import uuid

import pytest

from orchestrator.registry import ModelRegistry, storage
from serve.auth import Authenticator, KeyStore
from tests.races import MODEL, WRITERS, assert_versions_hold_their_writers, race, register


@pytest.fixture
def root(s3_server):
    return f"s3://{s3_server.bucket}/writers-{uuid.uuid4().hex[:8]}"


def test_conditional_writes_reach_the_server(root, s3_server):
    url = storage.join(root, "doc.json")
    assert storage.create_exclusive(url, b"first")
    assert not storage.create_exclusive(url, b"second")
    data, etag = storage.read_with_version(url)
    assert (data, etag) == (b"first", s3_server.client().head_object(Bucket=s3_server.bucket, Key=_key(url))["ETag"])
    assert storage.compare_and_swap(url, b"v2", etag)
    assert not storage.compare_and_swap(url, b"v3 from a stale read", etag)
    assert s3_server.read(_key(url)) == b"v2"
    assert storage.read_with_version(storage.join(root, "missing.json")) == (None, None)


def test_racing_registrations_get_distinct_versions_that_all_load(root, s3_server):
    versions = race(lambda i: register(root, i), processes=False)
    assert_versions_hold_their_writers(root, versions)
    claims = [k for k in s3_server.keys(_key(root)) if k.endswith("/claim.json")]
    assert len(claims) == WRITERS


def test_racing_alias_and_tag_writers_keep_every_alias_and_tag(root, s3_server):
    register(root, 0)
    register(root, 1)
    registry = ModelRegistry(root)

    def write(i: int) -> None:
        registry.set_alias(MODEL, f"alias-{i}", 1 + i % 2)
        registry.set_tags(MODEL, 1, {f"tag-{i}": str(i)})

    race(write, processes=False)
    expected = {f"alias-{i}": 1 + i % 2 for i in range(WRITERS)}
    assert json.loads(s3_server.read(f"{_key(root)}/registry/{MODEL}/aliases.json")) == expected
    assert registry.tags(MODEL, 1) == {f"tag-{i}": str(i) for i in range(WRITERS)}


def test_racing_key_writers_keep_every_creation_and_revocation(root, s3_server):
    store = KeyStore(storage.join(root, "serving", "api_keys.json"))
    old = [store.create(f"old-{i}", ["infer"])[1].id for i in range(WRITERS)]

    def write(i: int) -> str:  # each writer creates a key and revokes an old one
        key = store.create(f"new-{i}", ["infer"])[0]
        store.revoke(old[i])
        return key

    keys = race(write, processes=False)
    entries = json.loads(s3_server.read(_key(store.url)))["keys"]
    assert sorted(e["name"] for e in entries.values() if e["revoked_at"] is None) == sorted(
        f"new-{i}" for i in range(WRITERS))
    assert sorted(e["name"] for e in entries.values() if e["revoked_at"]) == sorted(f"old-{i}" for i in range(WRITERS))
    auth = Authenticator(store, ttl_s=0)
    assert [auth.check(f"Bearer {key}", "infer").name for key in keys] == [f"new-{i}" for i in range(WRITERS)]


def _key(url: str) -> str:
    """The object key of an s3:// URL."""
    return url.removeprefix("s3://").split("/", 1)[1]
