"""Fields shared by every LIT config; each configs/*.py starts from `lit_config()` and changes what differs."""

from ml_collections import ConfigDict

from lit_jax.data import default_data_config


def lit_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "lit"
    c.seed = 0
    c.model = ConfigDict(dict(
        source="smollm2",  # an HF directory, a .gguf file, "smollm2", or "random" (tests)
        tokenizer="smollm2",  # only for source="random"
        random=ConfigDict(dict(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                               head_dim=16, tie_embeddings=True, rope_theta=10000.0)),
        dtype="float32",  # base weights and activations; trainable params and optimizer state are float32
        scan_layers=True,
        remat="none",  # none | full | dots | dots_no_batch | gate_up | matmuls (see models/llama.py _REMAT_POLICIES)
    ))
    c.mesh = ConfigDict(dict(shape=(-1, 1, 1), distributed=False))  # (data, fsdp, tensor)
    c.data = default_data_config()
    c.lit = ConfigDict(dict(
        write_layer=0,  # the decoder block after which activations are written (read layers: data.read_layers)
        write_mode="replace",  # replace (LatentQA) | add_norm_matched (Activation Oracles)
        projection="identity",  # identity | linear | mlp (all start as the identity)
        norm_match=False,
        mlp_hidden=0,
        full_finetune=False,
        lora_rank=16,
        lora_alpha=32.0,
        lora_targets=("q", "k", "v", "o", "gate", "up", "down"),
        ablate="none",  # none | zeros: train/evaluate with every read activation replaced by 0
    ))
    c.train = ConfigDict(dict(
        steps=100, lr=2e-4, warmup_steps=10, weight_decay=0.0, clip_norm=1.0, accum_steps=1,
        log_every=10, eval_every=0, checkpoint_every=50, keep_checkpoints=2, async_checkpoints=True,
        eval_examples=0,  # held-out examples evaluated (evenly spread, fixed); 0: all
        pack=True,  # merge shared prefixes of a batch into prefix trees, drop padding (lit_jax/data/packing.py)
        pack_multiple=16,  # packed lengths are rounded up to a multiple of this (fewer shapes to compile)
        pack_levels=3,  # padded size levels per length bucket: compiled shapes per bucket
        presize_batches=64,  # look-ahead train batches (and all held-out ones) that plan the levels up front
    ))
    c.demo = ConfigDict(dict(num_examples=3, source_contains="system", max_new_tokens=40))
    c.export = ConfigDict(dict(hf_dir="", overwrite=False))  # "": no export of the merged decoder
    return c
