"""A local web page to ask a trained decoder questions (task `serve`; lit_jax/serve/).

    python -m lit_jax.main --config=configs/serve.py --config.decoder=workdirs/smollm2_demo
    python -m lit_jax.main --config=configs/serve.py --config.decoder=workdirs/smollm2_demo \
        --config.serve.steering='("gg=workdirs/smollm2_demo/golden_gate_vectors",)' --config.serve.port=8008

Then open http://127.0.0.1:8000/ (the default). Only the decoder and the steering results
named here are loaded; the page cannot name paths. Listening on another host than
127.0.0.1 lets anyone who reaches it use the model (a warning is printed).
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.task = "serve"
    c.seed = 0
    c.decoder = ""  # a `lit` run's work dir, or a directory its export wrote
    c.decoder_step = -1  # the checkpoint step to load; -1: the latest
    c.target = ""  # other weights for the target (must be the model the decoder was trained on); "": as trained
    c.serve = ConfigDict(dict(
        host="127.0.0.1",  # local only by default
        port=8000,
        steering=(),  # saved `control` results ("dir" or "name=dir") the page may apply
        max_read_tokens=512,  # the rendered read (dialog template included)
        max_read_chars=20_000,  # characters of a text / all turns, checked before tokenizing
        max_questions=8,  # questions per request
        max_question_chars=500,
        max_new_tokens=48,  # per answer
        max_token_view=128,  # span tokens coloured by P(Yes) in one request
        max_prompt_chars=2_000,  # the steering comparison's user prompt
        steer_max_new_tokens=48,  # per generation of the steering comparison
        max_cached_reads=32,  # reads kept (tokens and residual stream) for later questions
        max_waiting=32,  # requests waiting for the model at once; more are refused (503)
    ))
    return c
