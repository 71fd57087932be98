"""The jitted training and evaluation steps.

One optimizer update per call. Gradient accumulation splits the batch into micro-batches
inside the same compiled function (`lax.scan`) and normalises by the total number of
target tokens, so k micro-batches give exactly the gradient of the whole batch. The
train state is donated: its buffers are reused for the new state.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from lit_jax.lit.config import LitConfig
from lit_jax.data.batch import LitBatch
from lit_jax.lit.loss import LossSums, lit_loss_sums
from lit_jax.lit.train_state import TrainState
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig


def _split_micro(batch: LitBatch, accum_steps: int) -> LitBatch:
    def split(x):
        if x.shape[0] % accum_steps:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by accum_steps={accum_steps}")
        return x.reshape(accum_steps, x.shape[0] // accum_steps, *x.shape[1:])

    return jax.tree.map(split, batch)


def train_step(
    state: TrainState,
    base: llama.Params,
    batch: LitBatch,
    *,
    cfg: ModelConfig,
    lcfg: LitConfig,
    optimizer: optax.GradientTransformation,
    accum_steps: int = 1,
) -> tuple[TrainState, dict]:
    def sums_and_grads(micro):
        def f(params):
            sums = lit_loss_sums(params, base, micro, cfg, lcfg)
            return sums.loss, sums

        (_, sums), grads = jax.value_and_grad(f, has_aux=True)(state.params)
        return sums, grads

    if accum_steps == 1:
        sums, grads = sums_and_grads(batch)
    else:
        def body(carry, micro):
            sums, grads = sums_and_grads(micro)
            return jax.tree.map(jnp.add, carry, (sums, grads)), None

        zero = (LossSums(*([jnp.zeros((), jnp.float32)] * 4)), jax.tree.map(jnp.zeros_like, state.params))
        (sums, grads), _ = jax.lax.scan(body, zero, _split_micro(batch, accum_steps))

    count = jnp.maximum(sums.count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": sums.loss / count,
        "accuracy": sums.correct / count,
        "target_tokens": sums.count,
        "decoder_tokens": sums.tokens,
        "grad_norm": optax.global_norm(grads),
    }
    return TrainState(state.step + 1, params, opt_state), metrics


def eval_sums(params: dict, base: llama.Params, batch: LitBatch, *, cfg: ModelConfig, lcfg: LitConfig) -> LossSums:
    return lit_loss_sums(params, base, batch, cfg, lcfg)


def jit_train_step(cfg: ModelConfig, lcfg: LitConfig, optimizer, accum_steps: int = 1, **jit_kwargs):
    """train_step(state, base, batch) compiled once per batch shape, state donated."""
    fn = functools.partial(train_step, cfg=cfg, lcfg=lcfg, optimizer=optimizer, accum_steps=accum_steps)
    return jax.jit(fn, donate_argnums=(0,), **jit_kwargs)


def jit_eval_step(cfg: ModelConfig, lcfg: LitConfig, **jit_kwargs):
    return jax.jit(functools.partial(eval_sums, cfg=cfg, lcfg=lcfg), **jit_kwargs)
