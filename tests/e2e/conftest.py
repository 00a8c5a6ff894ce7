"""The e2e tier drives the product from outside, as a user would: `python -m jobs.<verb>` subprocesses,
`ray job submit` to a local multi-node cluster, and real HTTP. Its helpers (run_job, job_env,
last_json_line, free_port) live in tests/support.py; the installed wheel in tests/e2e/installed.py.

Each job starts Ray in its own processes, never in the test process; the integration tier's Ray is
shut down before this tier starts (tests/conftest.py orders the tiers, tests/integration/conftest.py
scopes that Ray to its package)."""

import pytest

from tests.e2e.installed import Installed, install


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> Installed:
    """The project's wheel in a fresh virtualenv outside the checkout, built once for the tier."""
    return install(tmp_path_factory.mktemp("install"))
