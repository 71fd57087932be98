"""The LIT computation for one batch: extract -> gather -> project -> decode with writes -> cross-entropy.

Pure and jittable; the training and evaluation steps differentiate or sum it. The
target is the frozen base (no LoRA, stopped after the last read layer, no gradient);
the decoder is the base plus LoRA (or its own fully fine-tuned weights).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lit_jax.lit.config import LitConfig
from lit_jax.lit.projection import project
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.residual import ResidualWrite

BATCH_KEYS = ("read_tokens", "read_valid", "read_positions", "slot_mask", "decoder_tokens", "decoder_valid",
              "write_positions", "target_positions", "target_mask", "read_layer")


class LossSums(NamedTuple):
    """Sums over a batch; divide by `count` for means (exact under gradient accumulation)."""

    loss: jax.Array  # summed token cross-entropy
    correct: jax.Array  # target tokens predicted exactly (argmax)
    count: jax.Array  # target tokens
    tokens: jax.Array  # decoder tokens processed (not padding)


def read_activations(base: llama.Params, batch: dict, cfg: ModelConfig, lcfg: LitConfig) -> jax.Array:
    """The target's residual stream at each example's read layer, gathered at its read positions: [B, S, D]."""
    hidden = llama.forward(base, batch["read_tokens"], cfg, valid=batch["read_valid"],
                           collect_layers=lcfg.read_layers).hidden  # [n, B, R, D]
    hidden = jax.lax.stop_gradient(hidden)
    layers = jnp.asarray(sorted(set(lcfg.read_layers)))
    which = jnp.argmax(batch["read_layer"][:, None] == layers[None, :], axis=1)  # [B]
    per_example = hidden[which, jnp.arange(hidden.shape[1])]  # [B, R, D]
    return jnp.take_along_axis(per_example, batch["read_positions"][..., None], axis=1)


def written_vectors(trainable: dict, base: llama.Params, read: dict, cfg: ModelConfig, lcfg: LitConfig) -> jax.Array:
    """What goes into the decoder's placeholders: the read activations (or zeros when ablated), projected."""
    acts = read_activations(base, read, cfg, lcfg)
    if lcfg.ablate == "zeros":
        acts = jnp.zeros_like(acts)
    return project(trainable["proj"], acts, lcfg)


def decoder_weights(trainable: dict, base: llama.Params, cfg: ModelConfig, lcfg: LitConfig):
    """(params, lora, lora_scale) of the decoder: the base plus LoRA, or its own fine-tuned weights."""
    if lcfg.full_finetune:
        return jax.tree.map(lambda w: w.astype(cfg.dtype), trainable["decoder"]), None, 1.0
    return base, trainable["lora"], lcfg.lora.scale


def lit_loss_sums(
    trainable: dict, base: llama.Params, batch: dict, cfg: ModelConfig, lcfg: LitConfig
) -> LossSums:
    vectors = written_vectors(trainable, base, batch, cfg, lcfg)
    decoder, lora, scale = decoder_weights(trainable, base, cfg, lcfg)
    idx, real = batch["target_positions"], batch["target_mask"]  # [B, P], P fixed per bucket
    out = llama.forward(
        decoder, batch["decoder_tokens"], cfg, valid=batch["decoder_valid"], lora=lora, lora_scale=scale,
        write=ResidualWrite(vectors, batch["write_positions"], batch["slot_mask"]),
        write_layer=lcfg.write_layer, write_mode=lcfg.write_mode,
        logits_at=jnp.maximum(idx - 1, 0),  # logits at t-1 predict token t
    )
    targets = jnp.take_along_axis(batch["decoder_tokens"], idx, axis=1)
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    w = real.astype(jnp.float32)
    return LossSums(
        loss=jnp.sum(nll * w),
        correct=jnp.sum((jnp.argmax(out.logits, -1) == targets) * w),
        count=jnp.sum(w),
        tokens=jnp.sum(batch["decoder_valid"]).astype(jnp.float32),
    )
