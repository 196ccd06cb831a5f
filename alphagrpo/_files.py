"""Folders that are complete or absent: ``atomic_dir`` fills a temporary sibling and renames it into place, so a
crash mid-write never leaves a half-written checkpoint or policy folder behind (only a hidden temporary one)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def replace_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder ``tmp`` at ``final`` (replacing an existing one) with renames only."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def atomic_dir(final, write: Callable[[Path], None]) -> None:
    """Create folder ``final`` atomically: ``write(tmp)`` fills a temporary sibling, renamed into place at the end."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is not
    try:
        write(tmp)
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
