"""A real S3-compatible server on loopback (moto's server mode) and the environment that points at it.

The server runs in its own process, so the test process, every Ray worker and every job subprocess
talk to it over HTTP exactly as they would to S3. The `s3_server` fixture (tests/integration/conftest.py)
starts it once for the integration tier.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List

import pytest

from tests.support import free_port

BUCKET = "orchestrator-tests"


def s3_env(endpoint: str) -> Dict[str, str]:
    """The variables a user sets to reach an S3-compatible store; boto3 and s3fs both read them."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str) -> List[str]:
        """Every object key under `prefix`, listed with boto3 (not through the s3fs the code under test uses)."""
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()


@contextlib.contextmanager
def running_s3_server(bucket: str = BUCKET, timeout_s: float = 30.0) -> Iterator[S3Server]:
    """Start moto's S3 server on a free loopback port with `bucket` created, and set the AWS
    variables in os.environ (restored afterwards) so that processes started from here reach it."""
    port = free_port()
    server = S3Server(endpoint=f"http://127.0.0.1:{port}", bucket=bucket)
    with tempfile.TemporaryFile() as log, pytest.MonkeyPatch.context() as env:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            for key, value in s3_env(server.endpoint).items():
                env.setenv(key, value)
            _wait_until_listening(proc, port, timeout_s, log)
            server.client().create_bucket(Bucket=bucket)
            yield server
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_until_listening(proc: subprocess.Popen, port: int, timeout_s: float, log) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto_server exited with {proc.returncode}:\n{log.read().decode()[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"moto_server (pid {proc.pid}) did not listen on port {port} within {timeout_s:.0f} s")
