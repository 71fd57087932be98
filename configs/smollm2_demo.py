"""The embedded default: LIT on SmolLM2-135M-Instruct (target and decoder) on a 2-core CPU, ~10 minutes.

Reads block 15 of 30, writes the activations after decoder block 0 (LatentQA), LoRA r=16.
Trains on the LatentQA train split (labels held out by seed), evaluates held-out answer
loss before and after on a fixed sample of held-out examples, then answers questions
about held-out system prompts. remat="matmuls" keeps, per block, only the matmul outputs the
backward needs (q|k|v, attention, gate and up, LoRA's x @ A) and the residual between the
two halves, and recomputes the elementwise rest: less peak memory at about the same step
time (README, benchmarks/train_step.py).
"""

from configs.common import lit_config


def get_config(arg: str | None = None):
    c = lit_config()
    c.model.remat = "matmuls"
    c.data.read_layers = (15,)
    c.data.batch_size = 4
    c.train.steps = 120
    c.train.lr = 5e-4
    c.train.warmup_steps = 10
    c.train.eval_every = 0
    c.train.eval_examples = 128
    c.train.checkpoint_every = 40
    return c
