"""The Hydra config tree as a package, so an installed wheel carries it: jobs compose `pkg://conf`.

Only the YAML files matter; `config.yaml` is the root every job composes."""
