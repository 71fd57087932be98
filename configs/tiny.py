"""A random 4-layer model over SmolLM2's tokenizer: the whole LIT job in about 2 minutes, mostly compiles (tests, dry runs)."""

from configs.common import lit_config


def get_config(arg: str | None = None):
    c = lit_config()
    c.model.source = "random"
    c.data.read_layers = (2,)
    c.data.max_records_per_source = 40
    c.data.storage = "memory"
    c.data.heldout_fraction = 0.2
    c.data.batch_size = 4
    c.lit.lora_rank = 4
    c.train.steps = 30
    c.train.lr = 3e-3
    c.train.warmup_steps = 3
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.demo.num_examples = 2
    c.demo.max_new_tokens = 8
    return c
