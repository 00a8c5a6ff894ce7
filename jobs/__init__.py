"""Hydra entrypoints, one per verb: `python -m jobs.<verb> key=value ...` (also under `ray job submit`)."""
