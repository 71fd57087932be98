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
from lit_jax.lit.cross_entropy import token_nll
from lit_jax.lit.projection import project
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.residual import ResidualWrite

BATCH_KEYS = ("read_tokens", "read_valid", "read_positions", "slot_mask", "decoder_tokens", "decoder_valid",
              "write_positions", "target_positions", "target_mask", "read_layer")
# A batch packed into prefix trees (data/packing.py); the step takes either form.
PACKED_KEYS = ("read_tokens", "read_valid", "read_pos", "read_end", "read_positions", "slot_layer", "slot_mask",
               "write_positions", "decoder_tokens", "decoder_valid", "decoder_pos", "decoder_end", "logit_positions",
               "target_tokens", "target_mask", "decoder_count")


def step_keys(batch: dict) -> tuple[str, ...]:
    """The fields the step reads from `batch` (packed or not)."""
    return PACKED_KEYS if "decoder_end" in batch else BATCH_KEYS


def packed_view(batch: dict) -> dict:
    """A collated batch in the packed form's terms (each row its own chain); packed batches pass through.

    One code path for both: tree_end None is plain causal attention.
    """
    if "decoder_end" in batch:
        return batch
    view = {k: batch[k] for k in ("read_tokens", "read_valid", "read_positions", "slot_mask") if k in batch}
    view.update(
        read_pos=llama.default_positions(batch["read_valid"]), read_end=None,
        slot_layer=jnp.broadcast_to(batch["read_layer"][:, None], batch["read_positions"].shape),
    )
    if "decoder_tokens" in batch:
        idx = batch["target_positions"]
        view.update(
            decoder_tokens=batch["decoder_tokens"], decoder_valid=batch["decoder_valid"],
            decoder_pos=llama.default_positions(batch["decoder_valid"]), decoder_end=None,
            write_positions=batch["write_positions"],
            logit_positions=jnp.maximum(idx - 1, 0),  # logits at t-1 predict token t
            target_tokens=jnp.take_along_axis(batch["decoder_tokens"], idx, axis=1),
            target_mask=batch["target_mask"], decoder_count=jnp.sum(batch["decoder_valid"], axis=1),
        )
    return view


class LossSums(NamedTuple):
    """Sums over a batch; divide by `count` for means (exact under gradient accumulation)."""

    loss: jax.Array  # summed token cross-entropy
    correct: jax.Array  # target tokens predicted exactly (argmax)
    count: jax.Array  # target tokens
    tokens: jax.Array  # decoder tokens of the batch's sequences (not padding; shared prefixes counted per sequence)


def read_activations(base: llama.Params, batch: dict, cfg: ModelConfig, lcfg: LitConfig) -> jax.Array:
    """The target's residual stream at each slot's read layer, gathered at its read position: [B, S, D]."""
    batch = packed_view(batch)
    hidden = llama.forward(base, batch["read_tokens"], cfg, valid=batch["read_valid"], positions=batch["read_pos"],
                           tree_end=batch["read_end"], collect_layers=lcfg.read_layers).hidden  # [n, B, R, D]
    hidden = jax.lax.stop_gradient(hidden)
    layers = jnp.asarray(sorted(set(lcfg.read_layers)))
    which = jnp.argmax(batch["slot_layer"][..., None] == layers, axis=-1)  # [B, S]
    rows = jnp.arange(hidden.shape[1])[:, None]
    return hidden[which, rows, batch["read_positions"]]


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
    batch = packed_view(batch)
    vectors = written_vectors(trainable, base, batch, cfg, lcfg)
    decoder, lora, scale = decoder_weights(trainable, base, cfg, lcfg)
    real, targets = batch["target_mask"], batch["target_tokens"]  # [B, P], P fixed per shape
    out = llama.forward(
        decoder, batch["decoder_tokens"], cfg, valid=batch["decoder_valid"], positions=batch["decoder_pos"],
        tree_end=batch["decoder_end"], lora=lora, lora_scale=scale,
        write=ResidualWrite(vectors, batch["write_positions"], batch["slot_mask"]),
        write_layer=lcfg.write_layer, write_mode=lcfg.write_mode,
        logits_at=batch["logit_positions"],  # the token before each target (its parent, when packed)
    )
    nll, hit = token_nll(out.logits, targets)
    w = real.astype(jnp.float32)
    return LossSums(
        loss=jnp.sum(nll * w),
        correct=jnp.sum(hit * w),
        count=jnp.sum(w),
        tokens=jnp.sum(batch["decoder_count"]).astype(jnp.float32),
    )
