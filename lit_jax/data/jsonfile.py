"""Loading a whole JSON file with file-level errors that name the file (and line/column)."""

from __future__ import annotations

import json
import os
from typing import Any

from lit_jax.data.errors import DataError


def load_json(path: str, display: str | None = None) -> Any:
    """Parsed JSON of `path`; DataError for a missing, empty or malformed file."""
    display = display or path
    if not os.path.isfile(path):
        raise DataError(f"{display}: file not found")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        raise DataError(f"{display}: empty file (no records)")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{display}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, (list, dict)) and not data:
        raise DataError(f"{display}: empty file (no records)")
    return data
