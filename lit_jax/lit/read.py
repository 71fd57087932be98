"""Reading: ask a trained decoder questions about a target's activations.

    reader = Reader(base, trainable, cfg, lcfg, tokenizer, data_cfg)
    reader.ask([tokenize_read(tokenizer, dialog, read_from_turn=1)], ["What persona will the assistant adopt?"])

The target runs on each read dialog (no adapters, stopped after the read layer), the
activations at the read positions are projected and written into the decoder's prompt
placeholders during prefill, and the answer is generated with the KV cache. One
compiled function per (batch, read length, slot count, prompt length) bucket.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.data import DecoderFormat, Slots, TokenTree, chains, decoder_prompt
from lit_jax.generate import SamplingConfig, end_token_ids, generate_tokens
from lit_jax.lit.config import LitConfig
from lit_jax.lit.loss import decoder_weights, written_vectors
from lit_jax.lit.residual_stream import ResidualWrite, write_edit
from lit_jax.models.config import ModelConfig
from lit_jax.padding import pad_batch, round_up


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "sampling", "eos_ids", "pad_id"))
def answer_tokens(trainable, base, read: TokenTree, slots: Slots, prompt_tokens, prompt_valid, rng, *,
                  cfg: ModelConfig, lcfg: LitConfig, sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int):
    """Generated answer tokens int32 [B, N] and lengths [B] for a batch of reads and decoder prompts [B, T]."""
    vectors = written_vectors(trainable, base, read, slots, cfg, lcfg)
    decoder, lora = decoder_weights(trainable, base, cfg, lcfg)
    write = ResidualWrite(vectors, slots.write_positions, slots.mask)
    return generate_tokens(decoder, prompt_tokens, prompt_valid, rng, cfg=cfg, sampling=sampling, eos_ids=eos_ids,
                           pad_id=pad_id, lora=lora, prefill_edit=write_edit(write, lcfg.write_layer, lcfg.write_mode))


class Reader:
    def __init__(self, base, trainable: dict, cfg: ModelConfig, lcfg: LitConfig, tokenizer: Any, data_cfg: Any,
                 sampling: SamplingConfig = SamplingConfig(max_new_tokens=48)):
        self.base, self.trainable, self.cfg, self.lcfg = base, trainable, cfg, lcfg
        self.tokenizer, self.data_cfg, self.sampling = tokenizer, data_cfg, sampling
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._fmt: DecoderFormat | None = None
        self._eos_ids: tuple[int, ...] | None = None

    @property
    def decoder_format(self) -> DecoderFormat:
        """The decoder's prompt format (built on first use). Raises TemplateError for an unusable template."""
        if self._fmt is None:
            self._fmt = DecoderFormat.create(self.tokenizer, self.data_cfg)
        return self._fmt

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """Where an answer stops: the decoder format's end-of-turn token (what training taught the
        decoder to emit) plus every other end token (lit_jax.generate.end_token_ids)."""
        if self._eos_ids is None:
            self._eos_ids = end_token_ids(self.cfg, self.tokenizer, extra=(self.decoder_format.end_of_turn_id,))
        return self._eos_ids

    def ask(self, reads: Sequence[tuple[np.ndarray, np.ndarray]], questions: Sequence[str], *,
            layer: int | None = None, seed: int = 0) -> list[str]:
        """One answer per (read, question) pair; a read is (read_tokens, read_positions) from tokenize_read.

        layer: the target layer read (default: the first trained one). Raises ValueError for
        a layer the decoder was not trained on, mismatched counts, or an empty read span;
        TemplateError when the chat template cannot give a decoder prompt. Each answer stops
        at its end-of-turn token (see `eos_ids`).
        """
        if len(reads) != len(questions):
            raise ValueError(f"{len(reads)} reads but {len(questions)} questions")
        if not reads:
            return []
        layer = self.lcfg.read_layers[0] if layer is None else layer
        if layer not in self.lcfg.read_layers:
            raise ValueError(f"layer {layer} was not trained; trained read layers: {self.lcfg.read_layers}")
        tokens, valid = pad_batch([r[0] for r in reads], self.pad_id, side="right")
        num_slots = round_up(max(len(r[1]) for r in reads), 8)  # bucket the slot count too
        read_positions = np.zeros((len(reads), num_slots), np.int32)
        slot_mask = np.zeros((len(reads), num_slots), bool)
        prompts, write_positions = [], np.zeros((len(reads), num_slots), np.int32)
        for i, ((_, pos), q) in enumerate(zip(reads, questions)):
            if len(pos) == 0:
                raise ValueError(f"read {i} has an empty read span")
            read_positions[i, : len(pos)] = pos
            slot_mask[i, : len(pos)] = True
            p = decoder_prompt(self.tokenizer, self.data_cfg, q, num_slots=len(pos), layer=layer,
                               fmt=self.decoder_format)
            prompts.append(p.tokens)
            write_positions[i, : len(pos)] = p.write_positions
        prompt_tokens, prompt_valid = pad_batch(prompts, self.pad_id, side="right")
        slots = Slots(read_positions, np.full_like(read_positions, layer), write_positions, slot_mask)
        out, lengths = answer_tokens(
            self.trainable, self.base, chains(tokens, valid), slots, jnp.asarray(prompt_tokens),
            jnp.asarray(prompt_valid), jax.random.key(seed), cfg=self.cfg, lcfg=self.lcfg,
            sampling=self.sampling, eos_ids=self.eos_ids, pad_id=self.pad_id,
        )
        out, lengths = np.asarray(out), np.asarray(lengths)
        return [self.tokenizer.decode(out[i, : lengths[i]], skip_special_tokens=True).strip()
                for i in range(len(reads))]
