"""Batched generation: prefill into a preallocated KV cache, then a jitted decode loop.

The whole generation (prefill + `lax.while_loop` over decode steps, stopping early once
every row has produced an end token) is one compiled function; prompts are padded to a
length bucket so a new batch of similar prompts reuses the compilation. Left- and
right-padded batches are both correct: each row writes its new tokens to its own cache
slots (see kv_cache.py). A residual-stream edit can be applied during prefill (LIT
reading writes activations into the decoder's prompt that way). A `Steering`
(models/steering.py: vectors added after blocks, or target adapters; lit/control.py
finds them) applies at every position of the prefill and of every decode step.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.models import kv_cache as kvc
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LoraWeights
from lit_jax.models.steering import Steering, steered_forward
from lit_jax.padding import pad_batch


class _SamplingFields(NamedTuple):
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0


class SamplingConfig(_SamplingFields):
    """How to pick each new token. A hashable tuple (a static argument of `generate_jit`).

    max_new_tokens: int >= 1. temperature: finite float >= 0; 0 is greedy (argmax).
    top_k: int >= 0; 0 keeps the whole vocabulary, and a top_k at or above the vocabulary
    size keeps it too (clamped in `_sample`, as transformers does). Anything else raises
    ValueError naming the field, here rather than deep inside the jitted function.
    """

    __slots__ = ()

    def __new__(cls, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0):
        def integer(name, v, least):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"SamplingConfig.{name}={v!r}: expected an integer >= {least}")
            if v < least:
                raise ValueError(f"SamplingConfig.{name}={v!r}: must be >= {least}"
                                 + (" (0 keeps the whole vocabulary)" if name == "top_k" else ""))
            return int(v)

        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise ValueError(f"SamplingConfig.temperature={temperature!r}: expected a number >= 0")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"SamplingConfig.temperature={temperature!r}: must be finite and >= 0 (0 is greedy)")
        return super().__new__(cls, integer("max_new_tokens", max_new_tokens, 1), float(temperature),
                               integer("top_k", top_k, 0))

    def _replace(self, **changes: Any) -> "SamplingConfig":
        """Like NamedTuple._replace, but the result is validated too."""
        return type(self)(**{**self._asdict(), **changes})


def _sample(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Next token per row of logits float [B, V] -> int32 [B].

    Greedy at temperature 0; otherwise softmax sampling at `temperature`, restricted to the
    `top_k` largest logits when 0 < top_k < V (top_k >= V keeps every token, as in transformers).
    """
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    top_k = min(sampling.top_k, logits.shape[-1])
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


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
    lora: LoraWeights | None = None,
    prefill_edit: llama.BlockEdit | None = None,
    steering: Steering | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Generates up to `sampling.max_new_tokens` per row of tokens int32 [B, T] (padding where ~valid).

    Pure and traceable: call it inside a jitted function (`generate` uses the jitted
    `generate_jit`). prefill_edit: a residual-stream edit applied to the prompt only.
    steering: vectors / adapters applied at every prompt and generated position (None: the
    plain model, exactly; ValueError if it carries adapters and `lora` is given too).
    Returns (new_tokens int32 [B, N] padded with pad_id after each row's end token,
    lengths int32 [B] counting tokens up to and including the end token).
    """
    B, T = tokens.shape
    N = sampling.max_new_tokens
    eos = jnp.asarray(eos_ids, jnp.int32)
    cache = kvc.init_cache(cfg, B, T + N)
    last = jnp.max(jnp.where(valid, jnp.arange(T), -1), axis=1)  # each row's last real token
    model = functools.partial(steered_forward, cfg=cfg, lora=lora, steering=steering)

    prefill = model(params, tokens, valid=valid, cache=cache, slots=jnp.broadcast_to(jnp.arange(T), (B, T)),
                    logits_at=last[:, None], edit=prefill_edit)
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


generate_jit = jax.jit(generate_tokens, static_argnames=("cfg", "sampling", "eos_ids", "pad_id"))


def end_token_ids(cfg: ModelConfig, tokenizer: Any = None, extra: Sequence[int] = ()) -> tuple[int, ...]:
    """Every token id that ends generation, from every source that defines one.

    The union of: the config's eos_token_ids (config.json's and generation_config.json's
    `eos_token_id`, merged at load time by lit_jax.hf.load_params), the tokenizer's eos token,
    the chat template's end-of-turn token (e.g. <|im_end|> where eos is <|endoftext|>; see
    lit_jax.data.decoder.template_end_of_turn_id), and `extra` (e.g. a decoder format's
    end-of-turn id). Raises ValueError when no source defines any.
    """
    from lit_jax.data.decoder import template_end_of_turn_id  # lazy: lit_jax.data is heavy to import

    ids = set(int(i) for i in cfg.eos_token_ids)
    ids.update(int(i) for i in extra)
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.add(int(tokenizer.eos_token_id))
        eot = template_end_of_turn_id(tokenizer)
        if eot is not None:
            ids.add(eot)
    if not ids:
        raise ValueError("no end-of-sequence token known: set eos_token_ids in the config, or pass a tokenizer "
                         "with an eos token or a chat template")
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
    lora: LoraWeights | None = None,
    steering: Steering | None = None,
) -> list[list[int]]:
    """Token-id lists in, generated token-id lists out (each ending at its end token, if any).

    Generation stops at any of `end_token_ids(cfg, tokenizer)` (config, generation_config,
    tokenizer eos, chat template end-of-turn). One compilation per (batch, padded prompt
    length, sampling) shape. steering: see `generate_tokens` (lit_jax.lit.control.load_steering
    gives one). Raises ValueError when no end token is known.
    """
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    tokens, valid = pad_batch(prompts, pad_id, padding_side)
    out, lengths = generate_jit(
        params, jnp.asarray(tokens), jnp.asarray(valid), jax.random.key(seed),
        cfg=cfg, sampling=sampling, eos_ids=end_token_ids(cfg, tokenizer), pad_id=pad_id, lora=lora,
        steering=steering,
    )
    out, lengths = np.asarray(out), np.asarray(lengths)
    return [out[i, : lengths[i]].tolist() for i in range(len(prompts))]


def chat(params, cfg: ModelConfig, tokenizer: Any, questions: Sequence[str], **kwargs: Any) -> list[str]:
    """Answers each user message with the tokenizer's chat template; returns the decoded replies.

    Each reply stops at the template's end-of-turn token as well as at every other end token
    (see `end_token_ids`). kwargs go to `generate` (sampling, seed, lora, steering, ...).
    Raises ValueError when no end token is known.
    """
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        for q in questions
    ]
    outs = generate(params, cfg, prompts, tokenizer=tokenizer, **kwargs)
    return [tokenizer.decode(o, skip_special_tokens=True).strip() for o in outs]
