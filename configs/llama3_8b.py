"""Llama-3-8B-Instruct target and decoder for GPU/TPU: read layer 15, write at 0, LoRA r=16, bf16 base.

Point --config.model.source at a local HF directory of Meta-Llama-3-8B-Instruct (safetensors).
Mesh: all devices on the fsdp axis; for a pod slice use e.g. --config.mesh.shape='(4,-1,1)' and
--config.mesh.distributed=True (see launch/).
"""

import json
import os

from configs.common import lit_config

# config.json of Meta-Llama-3-8B-Instruct: the plan task and tests build the model abstractly, without weights.
CONFIG_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "llama3_8b.config.json")
with open(CONFIG_JSON) as _f:
    HF_CONFIG = json.load(_f)


def get_config(arg: str | None = None):
    c = lit_config()
    c.model.source = "/path/to/Meta-Llama-3-8B-Instruct"
    c.model.dtype = "bfloat16"
    c.model.scan_layers = True
    c.model.remat = "dots_no_batch"
    c.mesh.shape = (1, -1, 1)
    c.data.read_layers = (15,)
    c.data.batch_size = 32
    c.data.storage = "tfds"
    c.train.steps = 2000
    c.train.lr = 1e-4
    c.train.warmup_steps = 100
    c.train.eval_every = 250
    c.train.checkpoint_every = 250
    c.train.keep_checkpoints = 3
    c.plan.model_config = CONFIG_JSON  # plan without the weights
    c.plan.device_memory_gb = 80.0  # an H100 80 GB
    return c
