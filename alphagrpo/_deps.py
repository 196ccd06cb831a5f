"""Optional dependencies, imported on use with an error that names the extra to install."""
from __future__ import annotations

import importlib


def require(module: str, extra: str):
    """Import an optional dependency, or raise an ImportError that names the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{module} is needed here: pip install 'alphagrpo[{extra}]' (or pip install "
                          f"{module.split('.')[0]})") from e
