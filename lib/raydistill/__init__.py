"""raydistill: from a labelled data set to a small, fast model served over HTTP, on Ray.

The Python API (see raydistill.api): `load_config`, `Pipeline`, `Run`, `Deployment`.
Names load on first use, so `import raydistill.data` in a Ray worker does not pull in the API.
"""

from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("raydistill")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

_API = {"load_config": "raydistill.config", "Config": "raydistill.config", "ConfigError": "raydistill.config",
        "Pipeline": "raydistill.api", "Run": "raydistill.api", "Deployment": "raydistill.api"}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'raydistill' has no attribute {name!r}")
