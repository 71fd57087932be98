"""The embedded default: LIT on SmolLM2-135M-Instruct (target and decoder) on a 2-core CPU, ~10 minutes.

Reads block 15 of 30, writes the activations after decoder block 0 (LatentQA), LoRA r=16.
Trains on the LatentQA train split (labels held out by seed), evaluates held-out answer
loss before and after on a fixed sample of held-out examples, then answers questions
about held-out system prompts. remat="gate_up" keeps only the gate|up matmul's output per
block and recomputes the rest in the backward pass: benchmarks/train_step.py measured
peak RSS 1.31-1.33 GB instead of 1.70 GB without remat, at about the same step time.
"""

from configs.common import lit_config


def get_config(arg: str | None = None):
    c = lit_config()
    c.model.remat = "gate_up"
    c.data.read_layers = (15,)
    c.data.batch_size = 4
    c.train.steps = 120
    c.train.lr = 5e-4
    c.train.warmup_steps = 10
    c.train.eval_every = 0
    c.train.eval_examples = 128
    c.train.checkpoint_every = 40
    return c
