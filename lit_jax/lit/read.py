"""Reading: ask a trained decoder questions about a target's activations.

    reader = load_decoder(workdir).reader()            # or Reader(base, trainable, cfg, lcfg, tokenizer, data_cfg)
    read = tokenize_read(tokenizer, dialog, read_from_turn=1)
    reader.ask([read], ["What persona will the assistant adopt?"])
    reader.score([read], ["Is the assistant a pirate?"], [["Yes", "No"]])   # log-probabilities, no generation
    reader.ask(each_token(read, last=5), ["Is this about the sea?"] * 5)    # one answer per token

The target runs on each read dialog (no adapters, stopped after the read layer), the
activations at the read positions are projected and written into the decoder's prompt
placeholders during prefill, and the answer is generated with the KV cache. One
compiled function per (batch, read length, slot count, prompt length) bucket. Scoring
(`score`, `score_examples`) packs its examples into prefix trees by default, so a read
asked several questions runs through the target once.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.data import DecoderFormat, Slots, TokenTree, chains, decoder_prompt, plain_batch
from lit_jax.data.batching import fit_bucket, fixed_rows
from lit_jax.data.batch import LitBatch
from lit_jax.data.packing import SIDES, pack_batch, target_examples
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
def answer_stats(trainable, base, batch: LitBatch, *, cfg: ModelConfig, lcfg: LitConfig
                 ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per row float32 [B]: the log-probability of its targets (its answer tokens and end-of-turn
    token, the tokens the training loss covers: minus the row's summed training cross-entropy),
    the number of targets, and how many of them are the decoder's argmax."""
    nll, hit = target_nll(trainable, base, batch, cfg, lcfg)
    w = batch.targets.mask.astype(jnp.float32)
    return -jnp.sum(nll * w, axis=-1), jnp.sum(w, axis=-1), jnp.sum(hit * w, axis=-1)


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def target_stats(trainable, base, batch: LitBatch, *, cfg: ModelConfig, lcfg: LitConfig
                 ) -> tuple[jax.Array, jax.Array]:
    """Per target float32 [B, P] (packed or plain rows): its log-probability (minus its training
    cross-entropy), and 1.0 where it is the decoder's argmax; both 0 where batch.targets.mask is False."""
    nll, hit = target_nll(trainable, base, batch, cfg, lcfg)
    w = batch.targets.mask.astype(jnp.float32)
    return -nll * w, hit.astype(jnp.float32) * w


def packed_size(n: int, multiple: int) -> int:
    """A padded packed length for n entries (never 0): n rounded up to `multiple` and to an
    eighth of n's power of two, i.e. four sizes per octave (512, 640, 768, 896, 1024, 1280, ...):
    at most 25% padding, and few shapes (compiles) over a run and across calls."""
    n = max(int(n), 1)
    return round_up(n, max(int(multiple), 1 << max(n.bit_length() - 3, 0)))


class ExampleScores(NamedTuple):
    """Per example float32 [N]: log-probability of its targets (natural log), target count, argmax hits."""

    logprob: np.ndarray
    tokens: np.ndarray
    correct: np.ndarray


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
            layer: int | None = None, seed: int = 0, text_only: bool = False) -> list[str]:
        """One answer (text) per (read, question) pair; see `ask_tokens`."""
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip()
                for t in self.ask_tokens(reads, questions, layer=layer, seed=seed, text_only=text_only)]

    def ask_tokens(self, reads: Sequence[tuple[np.ndarray, np.ndarray]], questions: Sequence[str], *,
                   layer: int | None = None, seed: int = 0, text_only: bool = False) -> list[list[int]]:
        """One answer per (read, question) pair; a read is (read_tokens, read_positions) from tokenize_read.

        layer: the target layer read (default: the first trained one). Raises ValueError for
        a layer the decoder was not trained on, mismatched counts, or an empty read span;
        TemplateError when the chat template cannot give a decoder prompt. Each answer stops
        at its end-of-turn token (see `eos_ids`). text_only: the control that shows the decoder
        the read's text (`read_text`) in place of the placeholders and writes nothing.
        """
        if len(reads) != len(questions):
            raise ValueError(f"{len(reads)} reads but {len(questions)} questions")
        if not reads:
            return []
        layers = self._layers(layer)
        tokens, valid = pad_batch([r[0] for r in reads], self.pad_id, side="right")
        # bucket the slot count too (text-only writes nothing: the smallest bucket)
        num_slots = 8 if text_only else round_up(max(len(r[1]) for r in reads) * len(layers), 8)
        read_positions = np.zeros((len(reads), num_slots), np.int32)
        slot_layers = np.full((len(reads), num_slots), layers[0], np.int32)
        slot_mask = np.zeros((len(reads), num_slots), bool)
        prompts, write_positions = [], np.zeros((len(reads), num_slots), np.int32)
        for i, ((_, pos), q) in enumerate(zip(reads, questions)):
            if len(pos) == 0:
                raise ValueError(f"read {i} has an empty read span")
            at = layers if len(layers) > 1 else layers[0]
            if text_only:
                p = self.decoder_format.prompt(len(pos), q.strip(), at, slot_text=self.read_text(reads[i]))
                self._check_length(i, len(p.tokens) + self.sampling.max_new_tokens, "prompt + max_new_tokens")
                prompts.append(p.tokens)
                continue
            n = len(pos) * len(layers)  # one placeholder run per layer, in layer order
            read_positions[i, :n] = np.tile(pos, len(layers))
            slot_layers[i, :n] = np.repeat(layers, len(pos))
            slot_mask[i, :n] = True
            p = decoder_prompt(self.tokenizer, self.data_cfg, q, num_slots=len(pos), layer=at,
                               fmt=self.decoder_format)
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
              layer: int | None = None, batch_size: int = 16, text_only: bool = False) -> list[np.ndarray]:
        """For each (read, question), the log-probability (natural log) of each candidate answer,
        float32 [len(candidates[i])]: the decoder's probability of exactly that answer followed by
        its end-of-turn token (the targets training uses), so candidates can be ranked without
        generating. text_only: the control that shows the read's text instead of its activations.
        Raises ValueError as `ask` does, and for a question with no candidates."""
        if not (len(reads) == len(questions) == len(candidates)):
            raise ValueError(f"{len(reads)} reads, {len(questions)} questions, {len(candidates)} candidate lists")
        for i, cands in enumerate(candidates):
            if not cands:
                raise ValueError(f"question {i} has no candidate answers")
        owner = np.asarray([i for i, cands in enumerate(candidates) for _ in cands])
        flat = [c for cands in candidates for c in cands]
        examples = self.examples([reads[i] for i in owner], [questions[i] for i in owner], flat, layer=layer,
                                 text_only=text_only)
        logprob = self.score_examples(examples, batch_size=batch_size).logprob
        return [logprob[owner == i] for i in range(len(reads))]

    def read_text(self, read: Read) -> str:
        """The text of a read's span (special tokens dropped): what the text-only control shows
        the decoder in place of the activations."""
        tokens, positions = read
        return self.tokenizer.decode(np.asarray(tokens)[np.asarray(positions)], skip_special_tokens=True).strip()

    def examples(self, reads: Sequence[Read], questions: Sequence[str], answers: Sequence[str], *,
                 layer: int | Sequence[int] | None = None, text_only: bool = False) -> list[dict]:
        """Decoder training examples (the dicts `collate` takes) for (read, question, answer) triples;
        text_only: the read's text (`read_text`) in place of the placeholders and nothing written.
        Raises ValueError as `ask` does, naming the example that cannot be built."""
        if not (len(reads) == len(questions) == len(answers)):
            raise ValueError(f"{len(reads)} reads, {len(questions)} questions, {len(answers)} answers")
        layers = self._layers(layer)
        at = layers if len(layers) > 1 else layers[0]
        for i, (_, pos) in enumerate(reads):
            if len(pos) == 0:
                raise ValueError(f"read {i} has an empty read span")
        texts = [self.read_text(r) for r in reads] if text_only else None
        built = self.decoder_format.examples([(len(r[1]), q.strip(), a.strip(), at)
                                              for r, q, a in zip(reads, questions, answers)], texts)
        out = []
        for i, ((tokens, pos), a, ex) in enumerate(zip(reads, answers, built)):
            if isinstance(ex, str):
                raise ValueError(f"answer {a!r} for question {i}: {ex}")
            dec, write, loss = ex
            self._check_length(i, len(dec), f"decoder sequence with answer {a!r}")
            n = 0 if text_only else len(pos)
            out.append({"read_tokens": np.asarray(tokens), "read_positions": np.tile(pos, len(layers))[: n * len(layers)],
                        "decoder_tokens": dec, "write_positions": write, "loss_mask": loss, "read_layer": layers[0],
                        "slot_layers": np.repeat(layers, n)})
        return out

    def score_examples(self, examples: Sequence[dict], *, batch_size: int = 16,
                       multiples: tuple[int, int, int, int] = (32, 8, 32, 8), pack: bool = True,
                       num_rows: int = 1) -> ExampleScores:
        """Scores of decoder examples (from `examples`, or built elsewhere in the same form), in
        their order: ExampleScores of float32 [len(examples)].

        pack=True (default): the examples are sorted so those with the same read tokens are
        adjacent (by read length, read, then decoder length), cut into chunks of `batch_size`,
        and each chunk is packed into `num_rows` prefix-tree rows (data/packing.py): each
        distinct read runs through the target once and each shared decoder prefix (template,
        placeholders, acknowledgement) through the decoder once. Every chunk is padded to one
        packed shape per call (the largest chunk's lengths (R, S, T, P) on the `packed_size`
        grid, `multiples` the smallest steps): one compile per call and shape. Chunks of 16 measured fastest on CPU for 4 x 4 choice groups (~2.3x plain
        rows); larger chunks share little more and pay for longer tree attention.
        pack=False: sorted by length, cut into batches of `batch_size` plain rows, each padded
        to its lengths rounded up to `multiples` (R, S, T, P). Both give the same scores up to
        float32 rounding. Raises ValueError (from packing) for a target at
        decoder position 0."""
        n = len(examples)
        out = ExampleScores(*(np.zeros(n, np.float32) for _ in range(3)))
        if n == 0:
            return out
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be at least 1")
        layer = int(self.lcfg.read_layers[0])
        if not pack:
            order = sorted(range(n), key=lambda i: (len(examples[i]["decoder_tokens"]),
                                                    len(examples[i]["read_tokens"])))
            for lo in range(0, n, batch_size):
                ids = order[lo: lo + batch_size]
                chunk = [examples[i] for i in ids]
                rows = fixed_rows(chunk, batch_size, fit_bucket(chunk, multiples), self.pad_id, layer)
                stats = answer_stats(self.trainable, self.base, plain_batch(rows), cfg=self.cfg, lcfg=self.lcfg)
                for dst, src in zip(out, stats):
                    dst[ids] = np.asarray(src)[: len(ids)]
            return out

        def read_key(i: int):
            tokens = np.asarray(examples[i]["read_tokens"], np.int32)
            return len(tokens), tokens.tobytes(), len(examples[i]["decoder_tokens"])

        order = sorted(range(n), key=read_key)
        steps = dict(zip(SIDES, multiples))  # SIDES: read, slot, decoder, target = (R, S, T, P)
        chunks, needs = [], []
        for lo in range(0, n, batch_size):
            ids = np.asarray(order[lo: lo + batch_size])
            chunk = [examples[i] for i in ids]
            rows = fixed_rows(chunk, len(chunk), fit_bucket(chunk, multiples), self.pad_id, layer)
            pack_batch(rows, num_rows, sizes=lambda need: needs.append(need) or need)
            chunks.append((ids, rows))
        # One packed shape for the whole call (the largest chunk's, on the packed_size grid): a
        # compile costs seconds on CPU and memory for its code, a little padding costs less.
        fixed = {k: packed_size(max(need[k] for need in needs), steps[k]) for k in SIDES}
        pending = []  # dispatch every chunk first (jit is asynchronous), so packing overlaps compute
        for ids, rows in chunks:
            batch = pack_batch(rows, num_rows, sizes=lambda need: fixed)
            stats = target_stats(self.trainable, self.base, batch, cfg=self.cfg, lcfg=self.lcfg)
            pending.append((ids, target_examples(rows, num_rows), stats))
        for ids, owners, (logprob, hit) in pending:
            logprob, hit = np.asarray(logprob), np.asarray(hit)
            sums = np.zeros((3, len(ids)), np.float64)
            for r, own in enumerate(owners):
                k = len(own)
                sums[0] += np.bincount(own, weights=logprob[r, :k], minlength=len(ids))
                sums[1] += np.bincount(own, minlength=len(ids))
                sums[2] += np.bincount(own, weights=hit[r, :k], minlength=len(ids))
            for dst, src in zip(out, sums):
                dst[ids] = src
        return out

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
