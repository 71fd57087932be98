"""Chat with SmolLM2-135M-Instruct on CPU: the model and generation, no LIT (a smoke test of the model).

--config.chat.steering=DIR: generate from the target steered by a `control` task result.
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.task = "chat"
    c.seed = 0
    c.model = ConfigDict(dict(source="smollm2", dtype="float32", scan_layers=True))
    c.chat = ConfigDict(dict(
        questions=("What is the capital of France?", "Give me one tip for writing clear code."),
        max_new_tokens=64,
        temperature=0.0,
        top_k=0,
        steering="",  # a directory the `control` task saved: the steered model answers
    ))
    return c
