"""The e2e tier drives the product from outside, as a user would: `python -m jobs.<verb>` subprocesses,
`ray job submit` to a local multi-node cluster, and real HTTP. Its helpers (run_job, job_env,
last_json_line, free_port) live in tests/support.py.

Each job starts Ray in its own processes, never in the test process; the integration tier's Ray is
shut down before this tier starts (tests/conftest.py orders the tiers, tests/integration/conftest.py
scopes that Ray to its package)."""
