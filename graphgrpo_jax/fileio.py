"""Atomic replacement of whole folders (a search index, an exported model): readers see old or new, never half."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile


def move_into_place(staging: pathlib.Path, directory: pathlib.Path) -> None:
    """Renames the finished folder `staging` onto `directory`, replacing an old one only once the new one
    exists (both must be on the same filesystem)."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    retired = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.retired-", dir=directory.parent))
    os.replace(directory, retired / directory.name)
    os.replace(staging, directory)
    shutil.rmtree(retired)
