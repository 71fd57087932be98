"""Ask a trained decoder about activations, from the command line (task `read`).

    python -m lit_jax.main --config=configs/read.py --config.decoder=workdirs/smollm2_demo \
        --config.read.input=questions.jsonl
    python -m lit_jax.main --config=configs/read.py --config.decoder=workdirs/smollm2_demo \
        --config.read.dialog='[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi!"}]' \
        --config.read.read_from_turn=1 --config.read.questions='("What persona will the assistant adopt?",)'

Input records use the training JSONL format (README, "Bring your own data"); `label` and `answer`
are optional (a given answer is shown as the true one). Prints a table and writes JSONL
(default <decoder>/reads.jsonl).
"""

from ml_collections import ConfigDict


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.task = "read"
    c.seed = 0
    c.decoder = ""  # a `lit` run's work dir
    c.decoder_step = -1  # the checkpoint step to load; -1: the latest
    c.target = ""  # other weights for the target (must be the model the decoder was trained on); "": as trained
    c.read = ConfigDict(dict(
        input="",  # JSONL records (dialog or text, question; optional label, answer)
        dialog="",  # or one dialog as a JSON list of {"role", "content"} turns ...
        text="",  # ... or one plain text
        read_from_turn=0,  # dialog: first turn read
        questions=(),  # the questions asked about `dialog` / `text`
        candidates=(),  # optional answers to score (log-probability, no generation), for every question
        each_token_last=0,  # > 0: one answer per token, for each of the last k read tokens
        layer=-1,  # the read layer; -1: the first trained one
        output="",  # JSONL written; "": <decoder>/reads.jsonl
        max_new_tokens=48,
        temperature=0.0,
        top_k=0,
        batch_size=8,
    ))
    return c
