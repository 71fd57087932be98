"""A directory written completely or not at all (exports, saved steering results).

Everything goes into a temporary sibling directory, which then replaces the target in one
rename: a crash never leaves a half-written directory that looks complete, and an existing
one is replaced only once the new one is whole.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


def write_directory(directory: str, fill: Callable[[str], None], *, overwrite: bool = True) -> str:
    """Calls fill(tmp_dir) to write the contents, then swaps tmp_dir in as `directory`.

    Returns the absolute path. Raises FileExistsError when `directory` exists and not
    overwrite (nothing is written); whatever fill raises, after removing the temporary dir.
    Files get the usual permissions (umask), not mkdtemp's private ones.
    """
    directory = os.path.abspath(directory)
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    try:
        fill(tmp)
        for root, dirs, files in os.walk(tmp):
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~umask)
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        old = None
        if os.path.exists(directory):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(directory)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
