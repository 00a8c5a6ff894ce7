"""orchestrator.client, the HTTP client of a running deployment: light to import, and it sends the
key and reports a refused check; against a tiny local HTTP server, no Ray."""

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
import pytest

from orchestrator.client import check_endpoint, http_json, wait_until_ready
from tests.support import REPO


def test_importing_the_client_loads_neither_torch_nor_ray():
    heavy = ("torch", "ray", "ray.serve")
    probe = f"import sys, orchestrator.client; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Handler(BaseHTTPRequestHandler):
    """Answers /v2/health/ready with 200 and POST .../infer with the body it got, 200 only with key 'k'."""

    def do_GET(self):
        self._answer(200 if self.path == "/v2/health/ready" else 404, {"path": self.path})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        keyed = self.headers.get("Authorization") == "Bearer k"
        self._answer(200 if keyed else 401, {"got": body} if keyed else {"error": "no key"})

    def _answer(self, status: int, body: dict) -> None:
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args):
        pass


@pytest.fixture()
def base_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@dataclass(frozen=True)
class _Deployment:
    endpoint: str
    api_key: Optional[str]


def test_check_endpoint_sends_rows_with_the_key_and_raises_when_refused(base_url):
    wait_until_ready(base_url, timeout_s=5)
    endpoint = f"{base_url}/v2/models/digits"
    answer = check_endpoint(_Deployment(endpoint, "k"), np.arange(6).reshape(2, 3))
    sent = {"name": "input", "shape": [2, 3], "datatype": "FP32", "data": [0, 1, 2, 3, 4, 5]}
    assert answer["got"] == {"id": "check_endpoint", "inputs": [sent]}
    with pytest.raises(RuntimeError, match="answered 401"):
        check_endpoint(_Deployment(endpoint, None), np.zeros((1, 3)))
    assert http_json("GET", f"{base_url}/nowhere") == (404, {"path": "/nowhere"})
