"""Trainable parameters, optimizer and the train state pytree (all float32)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lit_jax.lit.config import LitConfig
from lit_jax.lit.projection import init_projection, projection_axes
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import init_lora, lora_axes


class TrainState(NamedTuple):
    step: jax.Array
    params: dict  # {"proj": ..., "lora": ...} or {"proj": ..., "decoder": full params}
    opt_state: Any


def init_trainable(key: jax.Array, cfg: ModelConfig, lcfg: LitConfig, base: llama.Params | None = None) -> dict:
    """LoRA (B = 0) and projection (identity): the untrained decoder is the base model."""
    k_lora, k_proj = jax.random.split(key)
    params = {"proj": init_projection(k_proj, cfg.hidden_size, lcfg)}
    if lcfg.full_finetune:
        if base is None:
            raise ValueError("full fine-tune needs the base params to copy")
        # A real copy: the state is donated, and must not alias the frozen target weights.
        params["decoder"] = jax.tree.map(lambda w: jnp.array(w, dtype=jnp.float32, copy=True), base)
    else:
        params["lora"] = init_lora(k_lora, cfg, lcfg.lora)
    return params


def trainable_axes(cfg: ModelConfig, lcfg: LitConfig) -> dict:
    axes = {"proj": projection_axes(lcfg)}
    if lcfg.full_finetune:
        axes["decoder"] = llama.param_axes(cfg)
    else:
        axes["lora"] = lora_axes(lcfg.lora)
    return axes


def learning_rate_schedule(lr: float, warmup_steps: int, total_steps: int, final_fraction: float = 0.1):
    """Linear warmup from 0, then cosine decay to lr * final_fraction at total_steps (per optimizer step)."""
    warmup = max(0, min(warmup_steps, total_steps - 1))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
        end_value=lr * final_fraction,
    )


def make_optimizer(lr: float, warmup_steps: int, total_steps: int, *, weight_decay: float = 0.0,
                   clip_norm: float = 1.0, b1: float = 0.9, b2: float = 0.999) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW; weight decay only on matrices (not biases/norms)."""
    decay_mask = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # noqa: E731
    return optax.chain(
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(learning_rate_schedule(lr, warmup_steps, total_steps), b1=b1, b2=b2,
                    weight_decay=weight_decay, mask=decay_mask),
    )


def init_state(params: dict, optimizer: optax.GradientTransformation) -> TrainState:
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))
