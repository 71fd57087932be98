"""Reading: ask a trained decoder questions about a target's activations.

    reader = load_decoder(workdir).reader()            # or Reader(base, trainable, cfg, lcfg, tokenizer, data_cfg)
    read = tokenize_read(tokenizer, dialog, read_from_turn=1)
    reader.ask([read], ["What persona will the assistant adopt?"])
    reader.score([read], ["Is the assistant a pirate?"], [["Yes", "No"]])   # log-probabilities, no generation
    reader.ask(each_token(read, last=5), ["Is this about the sea?"] * 5)    # one answer per token

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

from lit_jax.data import DecoderFormat, Slots, TokenTree, chains, decoder_prompt, plain_batch
from lit_jax.data.batching import collate
from lit_jax.data.batch import LitBatch
from lit_jax.generate import SamplingConfig, end_token_ids, generate_tokens
from lit_jax.lit.config import LitConfig
from lit_jax.lit.loss import decoder_weights, target_nll, written_vectors
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


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def answer_logprobs(trainable, base, batch: LitBatch, *, cfg: ModelConfig, lcfg: LitConfig) -> jax.Array:
    """Log-probability [B] float32 of each row's targets (its answer tokens and end-of-turn token,
    the tokens the training loss covers): minus the row's summed training cross-entropy."""
    nll, _ = target_nll(trainable, base, batch, cfg, lcfg)
    return -jnp.sum(nll * batch.targets.mask.astype(jnp.float32), axis=-1)


Read = tuple  # (read_tokens int32 [R], read_positions int32 [S]) from lit_jax.data.tokenize_read


def each_token(read: Read, last: int | None = None) -> list[Read]:
    """One read per token of `read`'s span (the last `last` of them, or all): S = 1 each, so the
    decoder answers about each token's activation alone. ValueError for last < 1."""
    tokens, positions = read
    if last is not None and last < 1:
        raise ValueError(f"last={last}: must be at least 1")
    chosen = positions if last is None else positions[-last:]
    return [(tokens, np.asarray([p], np.int32)) for p in chosen]


def segment(read: Read, start: int, end: int) -> Read:
    """The read restricted to span tokens [start, end) (indices into its read positions; negative
    counts from the end, as in Python). ValueError for an empty segment."""
    tokens, positions = read
    chosen = positions[start:end]
    if len(chosen) == 0:
        raise ValueError(f"segment [{start}, {end}) of a {len(positions)}-token read span is empty")
    return tokens, chosen


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
        """One answer (text) per (read, question) pair; see `ask_tokens`."""
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip()
                for t in self.ask_tokens(reads, questions, layer=layer, seed=seed)]

    def ask_tokens(self, reads: Sequence[tuple[np.ndarray, np.ndarray]], questions: Sequence[str], *,
                   layer: int | None = None, seed: int = 0) -> list[list[int]]:
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
        layers = self._layers(layer)
        tokens, valid = pad_batch([r[0] for r in reads], self.pad_id, side="right")
        num_slots = round_up(max(len(r[1]) for r in reads) * len(layers), 8)  # bucket the slot count too
        read_positions = np.zeros((len(reads), num_slots), np.int32)
        slot_layers = np.full((len(reads), num_slots), layers[0], np.int32)
        slot_mask = np.zeros((len(reads), num_slots), bool)
        prompts, write_positions = [], np.zeros((len(reads), num_slots), np.int32)
        for i, ((_, pos), q) in enumerate(zip(reads, questions)):
            if len(pos) == 0:
                raise ValueError(f"read {i} has an empty read span")
            n = len(pos) * len(layers)  # one placeholder run per layer, in layer order
            read_positions[i, :n] = np.tile(pos, len(layers))
            slot_layers[i, :n] = np.repeat(layers, len(pos))
            slot_mask[i, :n] = True
            p = decoder_prompt(self.tokenizer, self.data_cfg, q, num_slots=len(pos),
                               layer=layers if len(layers) > 1 else layers[0], fmt=self.decoder_format)
            self._check_length(i, len(p.tokens) + self.sampling.max_new_tokens, "prompt + max_new_tokens")
            prompts.append(p.tokens)
            write_positions[i, :n] = p.write_positions
        prompt_tokens, prompt_valid = pad_batch(prompts, self.pad_id, side="right")
        slots = Slots(read_positions, slot_layers, write_positions, slot_mask)
        out, lengths = answer_tokens(
            self.trainable, self.base, chains(tokens, valid), slots, jnp.asarray(prompt_tokens),
            jnp.asarray(prompt_valid), jax.random.key(seed), cfg=self.cfg, lcfg=self.lcfg,
            sampling=self.sampling, eos_ids=self.eos_ids, pad_id=self.pad_id,
        )
        out, lengths = np.asarray(out), np.asarray(lengths)
        return [out[i, : lengths[i]].tolist() for i in range(len(reads))]

    def score(self, reads: Sequence[Read], questions: Sequence[str], candidates: Sequence[Sequence[str]], *,
              layer: int | None = None, batch_size: int = 16) -> list[np.ndarray]:
        """For each (read, question), the log-probability (natural log) of each candidate answer,
        float32 [len(candidates[i])]: the decoder's probability of exactly that answer followed by
        its end-of-turn token (the targets training uses), so candidates can be ranked without
        generating. Raises ValueError as `ask` does, and for a question with no candidates."""
        if not (len(reads) == len(questions) == len(candidates)):
            raise ValueError(f"{len(reads)} reads, {len(questions)} questions, {len(candidates)} candidate lists")
        layers = self._layers(layer)
        layer = layers if len(layers) > 1 else layers[0]
        items, owner = [], []
        for i, ((tokens, pos), q, cands) in enumerate(zip(reads, questions, candidates)):
            if len(pos) == 0:
                raise ValueError(f"read {i} has an empty read span")
            if not cands:
                raise ValueError(f"question {i} has no candidate answers")
            for c in cands:
                items.append((len(pos), q.strip(), c.strip(), layer))
                owner.append(i)
        built = self.decoder_format.examples(items)
        examples = []
        for (s, q, c, _), ex, i in zip(items, built, owner):
            if isinstance(ex, str):
                raise ValueError(f"candidate {c!r} for question {i}: {ex}")
            tokens, write, loss = ex
            self._check_length(i, len(tokens), f"decoder sequence with candidate {c!r}")
            examples.append({"read_tokens": reads[i][0], "read_positions": np.tile(reads[i][1], len(layers)),
                             "decoder_tokens": tokens, "write_positions": write, "loss_mask": loss,
                             "read_layer": layers[0], "slot_layers": np.repeat(layers, len(reads[i][1]))})
        out = np.zeros(len(examples), np.float32)
        for lo in range(0, len(examples), batch_size):
            chunk = examples[lo: lo + batch_size]
            bucket = (round_up(max(len(e["read_tokens"]) for e in chunk), 16),
                      round_up(max(len(e["read_positions"]) for e in chunk), 8),
                      round_up(max(len(e["decoder_tokens"]) for e in chunk), 16))
            targets = round_up(max(int(e["loss_mask"].sum()) for e in chunk), 8)
            rows = collate(chunk + [None] * (batch_size - len(chunk)), range(batch_size), bucket, self.pad_id,
                           layers[0], targets)
            lp = answer_logprobs(self.trainable, self.base, plain_batch(rows), cfg=self.cfg, lcfg=self.lcfg)
            out[lo: lo + len(chunk)] = np.asarray(lp)[: len(chunk)]
        owner = np.asarray(owner)
        return [out[owner == i] for i in range(len(reads))]

    def _check_length(self, i: int, n: int, what: str) -> None:
        limit = int(self.data_cfg.get("max_decoder_tokens", 0) or 0)
        if limit and n > limit:
            raise ValueError(f"question {i}: its {what} is {n} decoder tokens, more than data.max_decoder_tokens="
                             f"{limit}; shorten the question (or the read span: one slot per read token)")

    def _layers(self, layer: int | Sequence[int] | None) -> tuple[int, ...]:
        """The layer(s) one read is read at. A decoder trained on one layer per example reads one
        of its trained layers (default: the first); one trained on all its layers at once
        (data.read_all_layers) reads exactly those (default). ValueError otherwise."""
        trained = tuple(self.lcfg.read_layers)
        if self.data_cfg.get("read_all_layers", False):
            if layer is not None and tuple(np.atleast_1d(layer).tolist()) != trained:
                raise ValueError(f"layer {layer}: this decoder was trained to read all of {trained} at once; "
                                 "read those (the default)")
            return trained
        layer = trained[0] if layer is None else layer
        if not isinstance(layer, (int, np.integer)):
            raise ValueError(f"layer {layer}: this decoder was trained on one layer per example; give one of "
                             f"{trained}")
        if int(layer) not in trained:
            raise ValueError(f"layer {layer} was not trained; trained read layers: {trained}")
        return (int(layer),)
