"""Llama-3-8B-Instruct target and decoder for GPU/TPU: read layer 15, write at 0, LoRA r=16, bf16 base.

Point --config.model.source at a local HF directory of Meta-Llama-3-8B-Instruct (safetensors).
Mesh: all devices on the fsdp axis; for a pod slice use e.g. --config.mesh.shape='(4,-1,1)' and
--config.mesh.distributed=True (see launch/).
"""

from configs.common import lit_config

# config.json of Meta-Llama-3-8B-Instruct: lets tests build the model abstractly, without weights.
HF_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
    "bos_token_id": 128000, "eos_token_id": [128001, 128009],
}


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
    return c
