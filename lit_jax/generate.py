"""Batched generation: prefill into a preallocated KV cache, then a jitted decode loop.

The whole generation (prefill + `lax.while_loop` over decode steps, stopping early once
every row has produced an end token) is one compiled function; prompts are padded to a
length bucket so a new batch of similar prompts reuses the compilation. Left- and
right-padded batches are both correct: each row writes its new tokens to its own cache
slots (see kv_cache.py). An activation write can be applied during prefill (reading).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.models import kv_cache as kvc
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.residual import ResidualWrite
from lit_jax.utils.tracing import count_trace


class SamplingConfig(NamedTuple):
    """temperature 0 is greedy; top_k 0 keeps the whole vocabulary."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0


def _sample(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(
    jax.jit,
    static_argnames=("cfg", "sampling", "eos_ids", "pad_id", "write_layer", "write_mode", "lora_scale"),
)
def generate_tokens(
    params: llama.Params,
    tokens: jax.Array,
    valid: jax.Array,
    rng: jax.Array,
    *,
    cfg: ModelConfig,
    sampling: SamplingConfig,
    eos_ids: tuple[int, ...],
    pad_id: int,
    write: ResidualWrite | None = None,
    write_layer: int = 0,
    write_mode: str = "replace",
    lora: llama.Params | None = None,
    lora_scale: float = 1.0,
) -> tuple[jax.Array, jax.Array]:
    """Generates up to `sampling.max_new_tokens` per row of tokens [B, T] (padding where ~valid).

    Returns (new_tokens [B, N] padded with pad_id after each row's end token, lengths [B]
    counting tokens up to and including the end token).
    """
    count_trace("generate_tokens")
    B, T = tokens.shape
    N = sampling.max_new_tokens
    eos = jnp.asarray(eos_ids, jnp.int32)
    cache = kvc.init_cache(cfg, B, T + N)
    last = jnp.max(jnp.where(valid, jnp.arange(T), -1), axis=1)  # each row's last real token
    model = functools.partial(llama.forward, cfg=cfg, lora=lora, lora_scale=lora_scale)

    prefill = model(
        params, tokens, valid=valid, positions=llama.default_positions(valid),
        cache=cache, slots=jnp.broadcast_to(jnp.arange(T), (B, T)), logits_at=last[:, None],
        write=write, write_layer=write_layer, write_mode=write_mode,
    )
    rng, step_rng = jax.random.split(rng)
    first = _sample(prefill.logits[:, 0], step_rng, sampling)
    out = jnp.full((B, N), pad_id, jnp.int32).at[:, 0].set(first)
    done = jnp.isin(first, eos)
    state = (1, first, done, out, prefill.cache, last + 1, valid.sum(axis=1).astype(jnp.int32), rng)

    def cond(state):
        i, _, done, *_ = state
        return (i < N) & ~jnp.all(done)

    def body(state):
        i, cur, done, out, cache, slot, pos, rng = state
        step = model(params, cur[:, None], valid=~done[:, None], positions=pos[:, None],
                     cache=cache, slots=slot[:, None])
        rng, step_rng = jax.random.split(rng)
        nxt = jnp.where(done, pad_id, _sample(step.logits[:, 0], step_rng, sampling))
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return i + 1, nxt, done | jnp.isin(nxt, eos), out, step.cache, slot + 1, pos + 1, rng

    _, _, _, out, *_ = jax.lax.while_loop(cond, body, state)
    is_end = jnp.isin(out, eos)
    lengths = jnp.where(is_end.any(axis=1), jnp.argmax(is_end, axis=1) + 1, N)
    return out, lengths


def bucket_length(n: int, multiple: int = 16) -> int:
    """Pads lengths up to a multiple so similar prompts share one compilation."""
    return max(multiple, -(-n // multiple) * multiple)


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int, side: str = "left", length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [B, T], valid [B, T]) with each sequence padded on `side` to `length` (default: bucket)."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side {side!r}; expected 'left' or 'right'")
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_batch needs at least one sequence, none of them empty")
    longest = max(len(s) for s in sequences)
    length = length or bucket_length(longest)
    if longest > length:
        raise ValueError(f"a sequence of {longest} tokens does not fit length {length}")
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    valid = np.zeros((len(sequences), length), bool)
    for i, s in enumerate(sequences):
        sl = slice(length - len(s), length) if side == "left" else slice(0, len(s))
        tokens[i, sl] = s
        valid[i, sl] = True
    return tokens, valid


def end_token_ids(cfg: ModelConfig, tokenizer: Any = None) -> tuple[int, ...]:
    """The config's end tokens plus the tokenizer's eos (ChatML's <|im_end|> etc.)."""
    ids = set(cfg.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("no end-of-sequence token known: set eos_token_ids in the config")
    return tuple(sorted(ids))


def generate(
    params: llama.Params,
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    *,
    tokenizer: Any = None,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    padding_side: str = "left",
    **model_kwargs: Any,
) -> list[list[int]]:
    """Token-id lists in, generated token-id lists out (each ending at its end token, if any)."""
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens, valid = pad_batch(prompts, pad_id, padding_side)
    out, lengths = generate_tokens(
        params, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(seed),
        cfg=cfg, sampling=sampling, eos_ids=end_token_ids(cfg, tokenizer), pad_id=pad_id, **model_kwargs,
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, : lengths[i]].tolist() for i in range(len(prompts))]


def chat(params, cfg: ModelConfig, tokenizer: Any, questions: Sequence[str], **kwargs: Any) -> list[str]:
    """Answers each user message with the tokenizer's chat template; returns the decoded replies."""
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        for q in questions
    ]
    outs = generate(params, cfg, prompts, tokenizer=tokenizer, **kwargs)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
