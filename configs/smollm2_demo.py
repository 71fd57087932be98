"""The embedded default: LIT on SmolLM2-135M-Instruct (target and decoder) on a 2-core CPU, ~10 minutes.

Reads block 15 of 30, writes the activations after decoder block 0 (LatentQA), LoRA r=16.
Trains on the LatentQA train split (labels held out by seed), evaluates held-out answer
loss, then answers questions about held-out system prompts.
"""

from configs.common import lit_config


def get_config(arg: str | None = None):
    c = lit_config()
    c.data.read_layers = (15,)
    c.data.batch_size = 8
    c.train.steps = 200
    c.train.lr = 5e-4
    c.train.warmup_steps = 20
    c.train.eval_every = 100
    c.train.checkpoint_every = 50
    return c
