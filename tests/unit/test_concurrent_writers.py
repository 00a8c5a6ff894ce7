"""Concurrent writers on local disk lose nothing: version claims, aliases, tags and the key store,
each raced by 8 processes (tests/races.py), and the storage primitives they stand on.
The same races on S3: tests/integration/test_concurrent_writers_s3.py."""

from __future__ import annotations

import json
import uuid

import pytest

import orchestrator.registry.tensors  # noqa: F401  torch imported once, before the writers fork
from orchestrator.registry import ModelRegistry, storage
from serve.auth import Authenticator, KeyStore
from tests.races import MODEL, WRITERS, assert_versions_hold_their_writers, race, register


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path):
    """A document URL on local disk, and on memory:// (the filesystem for anything else)."""
    if request.param == "file":
        return f"{tmp_path.as_uri()}/docs/doc.json"
    return f"memory://writers-{uuid.uuid4().hex}/doc.json"


def test_create_exclusive_creates_once_and_keeps_the_first_contents(url):
    assert storage.create_exclusive(url, b"first")
    assert not storage.create_exclusive(url, b"second")
    assert storage.read_bytes(url) == b"first"


def test_compare_and_swap_refuses_a_stale_token(url):
    assert storage.read_with_version(url) == (None, None)
    assert storage.compare_and_swap(url, b"v1", None)
    assert not storage.compare_and_swap(url, b"v1 again", None)  # None means: only if there is none
    data, token = storage.read_with_version(url)
    assert data == b"v1"
    assert storage.compare_and_swap(url, b"v2", token)
    assert not storage.compare_and_swap(url, b"v3 from a stale read", token)
    assert storage.read_bytes(url) == b"v2"


def test_update_json_leaves_the_document_when_the_change_raises(url):
    storage.update_json(url, lambda doc: {"a": 1})

    def refuse(doc):
        raise KeyError("no such entry")

    with pytest.raises(KeyError, match="no such entry"):
        storage.update_json(url, refuse)
    assert json.loads(storage.read_bytes(url)) == {"a": 1}


def test_update_json_loses_no_increment_of_racing_processes(tmp_path):
    url = f"{tmp_path.as_uri()}/counter.json"
    race(lambda i: storage.update_json(url, lambda doc: {"n": (doc or {"n": 0})["n"] + 1}), processes=True)
    assert json.loads(storage.read_bytes(url)) == {"n": WRITERS}


def test_racing_registrations_get_distinct_versions_that_all_load(tmp_path):
    root = tmp_path.as_uri()
    versions = race(lambda i: register(root, i), processes=True)
    assert_versions_hold_their_writers(root, versions)


def test_racing_alias_and_tag_writers_keep_every_alias_and_tag(tmp_path):
    root = tmp_path.as_uri()
    register(root, 0)
    register(root, 1)
    registry = ModelRegistry(root)
    registry.set_alias(MODEL, "doomed", 1)

    def write(i: int) -> None:
        registry.set_alias(MODEL, f"alias-{i}", 1 + i % 2)
        registry.set_tags(MODEL, 1, {f"tag-{i}": str(i)})
        if i == 0:
            registry.delete_alias(MODEL, "doomed")

    race(write, processes=True)
    assert registry.aliases(MODEL) == {f"alias-{i}": 1 + i % 2 for i in range(WRITERS)}
    assert registry.tags(MODEL, 1) == {f"tag-{i}": str(i) for i in range(WRITERS)}


def test_racing_key_creations_keep_every_key_and_each_one_authenticates(tmp_path):
    store = KeyStore(f"{tmp_path.as_uri()}/serving/api_keys.json")
    keys = race(lambda i: store.create(f"writer-{i}", ["infer"])[0], processes=True)
    assert sorted(k.name for k in store.list()) == sorted(f"writer-{i}" for i in range(WRITERS))
    auth = Authenticator(store, ttl_s=0)
    assert [auth.check(f"Bearer {key}", "infer").name for key in keys] == [f"writer-{i}" for i in range(WRITERS)]


def test_racing_revocations_and_creations_keep_every_change(tmp_path):
    store = KeyStore(f"{tmp_path.as_uri()}/serving/api_keys.json")
    old = [store.create(f"old-{i}", ["infer"])[1].id for i in range(WRITERS // 2)]

    def write(i: int) -> str:  # even writers revoke an old key while odd ones create new keys
        return store.revoke(old[i // 2]).id if i % 2 == 0 else store.create(f"new-{i}", ["infer"])[1].id

    race(write, processes=True)
    revoked = {k.name for k in store.list() if k.revoked_at is not None}
    active = {k.name for k in store.list() if k.revoked_at is None}
    assert revoked == {f"old-{i}" for i in range(WRITERS // 2)}
    assert active == {f"new-{i}" for i in range(1, WRITERS, 2)}
