"""The LIT computation for one batch: read -> gather -> project -> decode with writes -> cross-entropy.

Pure and jittable; the training and evaluation steps differentiate or sum it. The
target is the frozen base (no LoRA, stopped after the last read layer, no gradient);
the decoder is the base plus LoRA (or its own fully fine-tuned weights). The batch is a
`lit_jax.data.LitBatch` (packed prefix trees or plain rows: one code path).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lit_jax.data.batch import LitBatch, Slots, TokenTree
from lit_jax.lit.config import LitConfig
from lit_jax.lit.cross_entropy import token_nll
from lit_jax.lit.projection import project
from lit_jax.lit.residual_stream import ResidualWrite, layer_index, read_residual_stream, write_edit
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LoraWeights


class LossSums(NamedTuple):
    """Sums over a batch; divide by `count` for means (exact under gradient accumulation)."""

    loss: jax.Array  # summed token cross-entropy
    correct: jax.Array  # target tokens predicted exactly (argmax)
    count: jax.Array  # target tokens
    tokens: jax.Array  # decoder tokens of the batch's sequences (not padding; shared prefixes counted per sequence)


def read_activations(base: llama.Params, read: TokenTree, slots: Slots, cfg: ModelConfig, lcfg: LitConfig
                     ) -> jax.Array:
    """The target's residual stream at each slot's read layer and read position: [B, S, D], no gradient."""
    hidden = read_residual_stream(base, read.tokens, cfg, lcfg.read_layers, valid=read.valid,
                                  positions=read.depth, subtree_end=read.subtree_end)  # [n, B, R, D]
    hidden = jax.lax.stop_gradient(hidden)
    rows = jnp.arange(hidden.shape[1])[:, None]
    return hidden[layer_index(slots.layer, lcfg.read_layers), rows, slots.read_positions]


def written_vectors(trainable: dict, base: llama.Params, read: TokenTree, slots: Slots, cfg: ModelConfig,
                    lcfg: LitConfig) -> jax.Array:
    """What goes into the decoder's placeholders [B, S, D] float32: the read activations
    (or zeros when ablated), projected."""
    acts = read_activations(base, read, slots, cfg, lcfg)
    if lcfg.ablate == "zeros":
        acts = jnp.zeros_like(acts)
    return project(trainable["proj"], acts, lcfg)


def decoder_weights(trainable: dict, base: llama.Params, cfg: ModelConfig, lcfg: LitConfig
                    ) -> tuple[llama.Params, LoraWeights | None]:
    """(params, adapters) of the decoder: the base plus LoRA, or its own fine-tuned weights."""
    if lcfg.full_finetune:
        return jax.tree.map(lambda w: w.astype(cfg.dtype), trainable["decoder"]), None
    return base, LoraWeights(trainable["lora"], lcfg.lora.scale)


def target_nll(trainable: dict, base: llama.Params, batch: LitBatch, cfg: ModelConfig, lcfg: LitConfig
               ) -> tuple[jax.Array, jax.Array]:
    """(negative log-likelihood, argmax hit) of each target token [B, P] float32 (mask: batch.targets.mask)."""
    vectors = written_vectors(trainable, base, batch.read, batch.slots, cfg, lcfg)
    decoder, lora = decoder_weights(trainable, base, cfg, lcfg)
    dec, targets = batch.decoder, batch.targets
    write = ResidualWrite(vectors, batch.slots.write_positions, batch.slots.mask)
    out = llama.forward(
        decoder, dec.tokens, cfg, valid=dec.valid, positions=dec.depth, subtree_end=dec.subtree_end, lora=lora,
        edit=write_edit(write, lcfg.write_layer, lcfg.write_mode),
        logits_at=targets.logit_positions,  # the token before each target (its parent, when packed)
    )
    return token_nll(out.logits, targets.tokens)


def lit_loss_sums(trainable: dict, base: llama.Params, batch: LitBatch, cfg: ModelConfig, lcfg: LitConfig
                  ) -> LossSums:
    """Summed answer-token cross-entropy, hits and counts of the decoder on `batch` (see LossSums)."""
    nll, hit = target_nll(trainable, base, batch, cfg, lcfg)
    w = batch.targets.mask.astype(jnp.float32)
    return LossSums(
        loss=jnp.sum(nll * w),
        correct=jnp.sum(hit * w),
        count=jnp.sum(w),
        tokens=jnp.sum(batch.decoder_count).astype(jnp.float32),
    )
