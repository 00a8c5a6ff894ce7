"""Ray Serve entry points for `serve run` / `serve deploy` (see serve/config.yaml)."""
