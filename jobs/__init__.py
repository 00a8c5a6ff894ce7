"""Entrypoints, one per verb: `python -m jobs.<verb> key=value ...` (also under `ray job submit`).

Each Hydra job is a plain `run(cfg) -> summary` made a main by `jobs._entry.hydra_job`; the tools
without Hydra (`jobs.keys`, `jobs.rollout`) share `jobs._entry`'s argparse conventions."""
