"""The model side of `serve`: one loaded decoder, reads cached by id, questions, token colours, steering.

    session = Session(load_decoder(workdir), {"golden_gate": load_steering(dir, cfg)}, Limits())
    read = session.create_read({"dialog": [{"role": "user", "content": "Hi!"}]})       # {"read_id", "tokens", ...}
    session.ask({"read_id": read["read_id"], "questions": ["What is this about?"]})   # {"answers": [...]}
    session.token_scores({"read_id": read["read_id"], "question": "Is it about the sea?"})  # P(Yes) per token
    session.steer({"prompt": "Tell me a story.", "steering": "golden_gate"})           # {"plain", "steered"}

Testable without HTTP; lit_jax/serve/app.py puts it behind FastAPI. Every public method
takes the request's JSON object (a dict) and returns a JSON-able dict; a bad request raises
`RequestError` naming the field, before any model work. Model calls run one at a time
(`Session.lock`): the target runs once per read (its residual stream at every trained read
layer is kept, keyed by the read id, for every later question, token and span), and every
jitted function sees padded shapes (reads to multiples of 64 tokens, question batches to
powers of two, slots to multiples of 8, prompts to multiples of 32; token colours packed
into prefix trees sized on lit_jax.lit.read.packed_size's grid), so after the first requests
of a size nothing compiles again.
"""

from __future__ import annotations

import collections
import functools
import threading
import time
import uuid
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.data import decoder_prompt, tokenize_read
from lit_jax.data.batch import LitBatch
from lit_jax.data.batching import fit_bucket, fixed_rows
from lit_jax.data.packing import SIDES, pack_batch, target_examples
from lit_jax.generate import SamplingConfig, chat, generate_tokens
from lit_jax.lit.config import LitConfig
from lit_jax.lit.control import decoder_nll
from lit_jax.lit.loss import decoder_weights
from lit_jax.lit.projection import project
from lit_jax.lit.read import packed_size
from lit_jax.lit.residual_stream import ResidualWrite, layer_index, layer_order, read_residual_stream, write_edit
from lit_jax.models.config import ModelConfig
from lit_jax.padding import round_up

READ_MULTIPLE = 64  # read lengths are padded to multiples of this (one compile per multiple)
SCORE_CHUNK = 16  # token colours: examples (two per span token) packed together, as Reader.score_examples
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A request the session refuses: `field` names the offending field of the request's JSON."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Limits(NamedTuple):
    """What one request may ask for (configs/serve.py documents each)."""

    max_read_tokens: int = 512
    max_read_chars: int = 20_000
    max_questions: int = 8
    max_question_chars: int = 500
    max_new_tokens: int = 48
    max_token_view: int = 128
    max_prompt_chars: int = 2_000
    steer_max_new_tokens: int = 48
    max_cached_reads: int = 32


class CachedRead(NamedTuple):
    tokens: np.ndarray  # int32 [R]: the whole rendered read
    positions: np.ndarray  # int32 [S]: the read span (indices into tokens)
    hidden: Any  # [n, R_pad, D] residual stream after each trained read layer (layer_order), or None until used


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def residual_stream(base, tokens, valid, *, cfg: ModelConfig, layers: tuple[int, ...]):
    """The target's residual stream for one read: tokens / valid [1, R] -> [len(layers), R, D] (layer_order)."""
    return read_residual_stream(base, tokens, cfg, layers, valid=valid)[:, 0]


def _gather(hidden, read_positions, slot_layers, lcfg: LitConfig):
    """Activations [B, S, D] of one read's cached stream [n, R, D] at read positions / layers [B, S]."""
    acts = hidden[layer_index(slot_layers, lcfg.read_layers), read_positions]
    return jnp.zeros_like(acts) if lcfg.ablate == "zeros" else acts


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg", "sampling", "eos_ids", "pad_id"))
def answer_from_stream(trainable, base, hidden, read_positions, slot_layers, write_positions, slot_mask,
                       prompt_tokens, prompt_valid, rng, *, cfg: ModelConfig, lcfg: LitConfig,
                       sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int):
    """lit_jax.lit.read.answer_tokens from a cached stream: answer tokens int32 [B, N] and lengths [B]
    for decoder prompts [B, T] whose slots [B, S] read the stream [n, R, D] of one read."""
    vectors = project(trainable["proj"], _gather(hidden, read_positions, slot_layers, lcfg), lcfg)
    decoder, lora = decoder_weights(trainable, base, cfg, lcfg)
    write = ResidualWrite(vectors, write_positions, slot_mask)
    return generate_tokens(decoder, prompt_tokens, prompt_valid, rng, cfg=cfg, sampling=sampling, eos_ids=eos_ids,
                           pad_id=pad_id, lora=lora, prefill_edit=write_edit(write, lcfg.write_layer, lcfg.write_mode))


@functools.partial(jax.jit, static_argnames=("cfg", "lcfg"))
def logprob_from_stream(trainable, base, hidden, batch: LitBatch, *, cfg: ModelConfig, lcfg: LitConfig):
    """Per target float32 [B, P]: its log-probability (0 where batch.targets.mask is False; as
    lit_jax.lit.read.target_stats), the slots reading the cached stream [n, R, D] of one read
    instead of running the target. batch: packed rows of examples that all read that one read
    (its read tree is then the read itself, so slot read positions are token positions)."""
    acts = _gather(hidden, batch.slots.read_positions, batch.slots.layer, lcfg)
    nll, _ = decoder_nll(trainable, base, acts[None], batch, cfg, lcfg)
    return -nll[0] * batch.targets.mask.astype(jnp.float32)


def _power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _field(req: dict, name: str, kind, default=None, *, required: bool = False):
    if not isinstance(req, dict):
        raise RequestError("body", f"the request must be a JSON object, not {type(req).__name__}")
    value = req.get(name, default)
    if value is None:
        if required:
            raise RequestError(name, "missing")
        return default
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise RequestError(name, f"must be an integer, got {value!r}")
    if kind is str and not isinstance(value, str):
        raise RequestError(name, f"must be a string, got {type(value).__name__}")
    if kind is list and not isinstance(value, list):
        raise RequestError(name, f"must be a list, got {type(value).__name__}")
    return value


class Session:
    """One trained decoder served: see the module docstring. `steering`: {name: LoadedSteering}
    (lit_jax.lit.control.load_steering), named when the server starts."""

    def __init__(self, decoder, steering: dict | None = None, limits: Limits = Limits(), seed: int = 0):
        self.decoder, self.steering, self.limits, self.seed = decoder, dict(steering or {}), limits, seed
        self.reader = decoder.reader(SamplingConfig(max_new_tokens=limits.max_new_tokens))
        self.steer_sampling = SamplingConfig(max_new_tokens=limits.steer_max_new_tokens)
        self.lock = threading.Lock()  # the one model worker: every model call holds it
        self._reads: collections.OrderedDict[str, CachedRead] = collections.OrderedDict()
        self._layers = layer_order(decoder.lcfg.read_layers)

    # ------------------------------------------------------------------ information

    def info(self) -> dict:
        """The decoder's settings (base model, trained layers, write mode, steps), the steering
        results by name and the limits: what the page shows."""
        d, lcfg = self.decoder, self.decoder.lcfg
        config = d.config
        lora = None if lcfg.lora is None else {"rank": lcfg.lora.rank, "alpha": lcfg.lora.alpha}
        read_all = bool(d.data_cfg.get("read_all_layers", False))
        return {
            "decoder": d.path,
            "base_model": str(config.model.source) if config is not None else "?",
            "num_layers": d.cfg.num_layers, "hidden_size": d.cfg.hidden_size,
            "read_layers": [int(x) for x in lcfg.read_layers], "read_all_layers": read_all,
            "write_layer": lcfg.write_layer, "write_mode": lcfg.write_mode, "projection": lcfg.projection,
            "lora": lora, "full_finetune": lcfg.full_finetune,
            "checkpoint_step": d.step,
            "training_steps": int(config.train.steps) if config is not None and "train" in config else None,
            "steering": {name: {k: s.settings.get(k) for k in ("method", "layers", "read_layer", "steps",
                                                                 "control_file", "loss_before", "loss_after")}
                         for name, s in self.steering.items()},
            "limits": self.limits._asdict(),
        }

    # ------------------------------------------------------------------ reads

    def create_read(self, req: dict) -> dict:
        """Tokenizes a read and caches it under a new id.

        req: "dialog" (list of {"role": system|user|assistant, "content"}) or "text" (str);
        "read_from_turn" (int, dialog only: the first turn read, earlier ones masked);
        "span_start" / "span_end" (ints, optional: keep span tokens [start, end), Python-style
        indices into the read span). Returns {"read_id", "tokens": [{"index", "text",
        "in_span"}], "span": [positions]}. RequestError naming the field for a missing or
        malformed read, an empty span or a read over limits.max_read_tokens / max_read_chars.
        """
        dialog, text = _field(req, "dialog", list), _field(req, "text", str)
        if (dialog is None) == (text is None):
            raise RequestError("dialog", "give exactly one of 'dialog' (a list of turns) or 'text'")
        lim = self.limits
        if text is not None:
            if not text.strip():
                raise RequestError("text", "is empty")
            if len(text) > lim.max_read_chars:
                raise RequestError("text", f"{len(text)} characters, more than the limit max_read_chars="
                                   f"{lim.max_read_chars}")
            source, field = text, "text"
        else:
            if not dialog:
                raise RequestError("dialog", "has no turns")
            for i, turn in enumerate(dialog):
                if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
                    raise RequestError(f"dialog[{i}]", "must be {\"role\": ..., \"content\": \"...\"}")
                if turn.get("role") not in ROLES:
                    raise RequestError(f"dialog[{i}].role", f"{turn.get('role')!r}; expected one of {ROLES}")
            total = sum(len(t["content"]) for t in dialog)
            if total > lim.max_read_chars:
                raise RequestError("dialog", f"{total} characters, more than the limit max_read_chars="
                                   f"{lim.max_read_chars}")
            source, field = [{"role": t["role"], "content": t["content"]} for t in dialog], "dialog"
        first = _field(req, "read_from_turn", int, 0)
        if text is not None and first:
            raise RequestError("read_from_turn", "applies to a dialog only")
        if dialog is not None and not 0 <= first < len(dialog):
            raise RequestError("read_from_turn", f"{first}: the dialog has turns 0..{len(dialog) - 1}")
        try:
            tokens, positions = tokenize_read(self.decoder.tokenizer, source, read_from_turn=first)
        except ValueError as e:
            raise RequestError(field, str(e)) from None
        if len(tokens) > lim.max_read_tokens:
            raise RequestError(field, f"the read is {len(tokens)} tokens, more than the limit max_read_tokens="
                               f"{lim.max_read_tokens}; shorten it")
        start, end = _field(req, "span_start", int), _field(req, "span_end", int)
        if start is not None or end is not None:
            chosen = positions[start:end]
            if len(chosen) == 0:
                raise RequestError("span_start", f"tokens [{start}, {end}) of the {len(positions)}-token read "
                                   "span are empty")
            positions = chosen
        read_id = uuid.uuid4().hex[:12]
        with self.lock:
            self._reads[read_id] = CachedRead(np.asarray(tokens, np.int32), np.asarray(positions, np.int32), None)
            while len(self._reads) > lim.max_cached_reads:
                self._reads.popitem(last=False)
        tok = self.decoder.tokenizer
        in_span = set(positions.tolist())
        return {"read_id": read_id, "span": positions.tolist(),
                "tokens": [{"index": i, "text": tok.decode([int(t)]), "in_span": i in in_span}
                           for i, t in enumerate(tokens)]}

    def _read(self, req: dict) -> tuple[str, CachedRead]:
        read_id = _field(req, "read_id", str, required=True)
        read = self._reads.get(read_id)
        if read is None:
            raise RequestError("read_id", f"{read_id!r} is unknown or expired (the server keeps the last "
                               f"{self.limits.max_cached_reads} reads): read it again")
        return read_id, read

    def _stream(self, read_id: str, read: CachedRead):
        """The read's cached residual stream (computed on first use; call holding the lock)."""
        read = self._reads.get(read_id, read)  # another request may have computed it meanwhile
        if read.hidden is None:
            n = len(read.tokens)
            padded = round_up(n, READ_MULTIPLE)
            tokens = np.zeros((1, padded), np.int32)
            tokens[0, :n] = read.tokens
            hidden = residual_stream(self.decoder.base, jnp.asarray(tokens), jnp.asarray(np.arange(padded) < n)[None],
                                     cfg=self.decoder.cfg, layers=self._layers)
            read = read._replace(hidden=hidden)
            if read_id in self._reads:
                self._reads[read_id] = read
        return read.hidden

    def _layer_arg(self, req: dict):
        layer = _field(req, "layer", int)
        try:
            return self.reader._layers(layer)
        except ValueError as e:
            raise RequestError("layer", str(e)) from None

    def _questions(self, req: dict) -> list[str]:
        questions = _field(req, "questions", list, required=True)
        if not questions:
            raise RequestError("questions", "ask at least one question")
        if len(questions) > self.limits.max_questions:
            raise RequestError("questions", f"{len(questions)} questions, more than the limit max_questions="
                               f"{self.limits.max_questions}")
        for i, q in enumerate(questions):
            self._check_question(f"questions[{i}]", q)
        return [q.strip() for q in questions]

    def _check_question(self, field: str, q: Any) -> None:
        if not isinstance(q, str) or not q.strip():
            raise RequestError(field, "must be a non-empty string")
        if len(q) > self.limits.max_question_chars:
            raise RequestError(field, f"{len(q)} characters, more than the limit max_question_chars="
                               f"{self.limits.max_question_chars}")

    # ------------------------------------------------------------------ questions

    def ask(self, req: dict) -> dict:
        """Answers questions about a cached read (greedy; the target is not run again).

        req: "read_id"; "questions" (list of str); "layer" (int, optional: a trained read layer);
        "token" (int, optional: the index of one read token, then the decoder reads that
        token's activation alone). Returns {"answers": [{"question", "answer"}], "seconds"}.
        RequestError for an unknown read, bad/too many/too long questions, an untrained layer,
        a token outside the read, or a decoder prompt longer than data.max_decoder_tokens.
        """
        read_id, read = self._read(req)
        questions = self._questions(req)
        layers = self._layer_arg(req)
        token = _field(req, "token", int)
        positions = read.positions
        if token is not None:
            if not 0 <= token < len(read.tokens):
                raise RequestError("token", f"{token}: the read has tokens 0..{len(read.tokens) - 1}")
            positions = np.asarray([token], np.int32)
        d, reader = self.decoder, self.reader
        at = layers if len(layers) > 1 else layers[0]
        rows = _power_of_two(len(questions))
        slots = round_up(len(positions) * len(layers), 8)
        read_positions = np.zeros((rows, slots), np.int32)
        slot_layers = np.full((rows, slots), layers[0], np.int32)
        write_positions = np.zeros((rows, slots), np.int32)
        slot_mask = np.zeros((rows, slots), bool)
        prompts = []
        limit = int(d.data_cfg.get("max_decoder_tokens", 0) or 0)
        for i, q in enumerate(questions):
            p = decoder_prompt(d.tokenizer, d.data_cfg, q, num_slots=len(positions), layer=at,
                               fmt=reader.decoder_format)
            need = len(p.tokens) + reader.sampling.max_new_tokens
            if limit and need > limit:
                raise RequestError(f"questions[{i}]", f"its decoder prompt and answer need {need} tokens, more "
                                   f"than data.max_decoder_tokens={limit}; shorten the question or the read span")
            n = len(positions) * len(layers)
            read_positions[i, :n] = np.tile(positions, len(layers))
            slot_layers[i, :n] = np.repeat(layers, len(positions))
            write_positions[i, :n] = p.write_positions
            slot_mask[i, :n] = True
            prompts.append(p.tokens)
        length = round_up(max(len(p) for p in prompts), 32)
        prompt_tokens = np.full((rows, length), reader.pad_id, np.int32)
        prompt_valid = np.zeros((rows, length), bool)
        for i in range(rows):
            p = prompts[min(i, len(prompts) - 1)]  # padding rows repeat the last question
            prompt_tokens[i, : len(p)], prompt_valid[i, : len(p)] = p, True
            if i >= len(prompts):
                for a in (read_positions, slot_layers, write_positions, slot_mask):
                    a[i] = a[len(prompts) - 1]
        started = time.perf_counter()
        with self.lock:
            hidden = self._stream(read_id, read)
            out, lengths = answer_from_stream(
                d.trainable, d.base, hidden, jnp.asarray(read_positions), jnp.asarray(slot_layers),
                jnp.asarray(write_positions), jnp.asarray(slot_mask), jnp.asarray(prompt_tokens),
                jnp.asarray(prompt_valid), jax.random.key(self.seed), cfg=d.cfg, lcfg=d.lcfg,
                sampling=reader.sampling, eos_ids=reader.eos_ids, pad_id=reader.pad_id)
            out, lengths = np.asarray(out), np.asarray(lengths)
        answers = [d.tokenizer.decode(out[i, : lengths[i]].tolist(), skip_special_tokens=True).strip()
                   for i in range(len(questions))]
        return {"answers": [{"question": q, "answer": a} for q, a in zip(questions, answers)],
                "token": token, "seconds": round(time.perf_counter() - started, 3)}

    def token_scores(self, req: dict) -> dict:
        """P(yes) of a yes/no question about each span token of a cached read, the decoder reading
        that token's activation alone (as lit_jax.lit.read.each_token + Reader.score).

        req: "read_id", "question" (str), optional "layer", "yes" / "no" (the two answers
        compared; default "Yes" / "No"). P(yes) = p(yes) / (p(yes) + p(no)) of the decoder's
        probabilities of each whole answer. Returns {"scores": [{"index", "text", "p_yes"}]}
        in span order. RequestError as `ask`, and for a span over limits.max_token_view.
        """
        read_id, read = self._read(req)
        question = _field(req, "question", str, required=True)
        self._check_question("question", question)
        yes, no = _field(req, "yes", str, "Yes"), _field(req, "no", str, "No")
        if not yes.strip() or not no.strip() or yes.strip() == no.strip():
            raise RequestError("yes", "the two answers must be different non-empty strings")
        layers = self._layer_arg(req)
        if len(read.positions) > self.limits.max_token_view:
            raise RequestError("read_id", f"the read span has {len(read.positions)} tokens, more than the limit "
                               f"max_token_view={self.limits.max_token_view}; choose a shorter span")
        d = self.decoder
        singles = [(read.tokens, np.asarray([p], np.int32)) for p in read.positions]
        try:
            examples = self.reader.examples([r for r in singles for _ in (0, 1)], [question] * (2 * len(singles)),
                                            [yes, no] * len(singles), layer=layers if len(layers) > 1 else layers[0])
        except ValueError as e:
            raise RequestError("question", str(e)) from None
        # Packed as Reader.score_examples packs (prefix trees: the template, question and each
        # token's placeholder computed once for its Yes and No), every chunk padded to one shape
        # on the packed_size grid (the read side to the cached stream's length).
        multiples = (READ_MULTIPLE, 8, 32, 8)
        chunks, needs = [], []
        for lo in range(0, len(examples), SCORE_CHUNK):
            chunk = examples[lo: lo + SCORE_CHUNK]
            rows = fixed_rows(chunk, len(chunk), fit_bucket(chunk, multiples), self.reader.pad_id, layers[0])
            pack_batch(rows, 1, sizes=lambda need: needs.append(need) or need)
            chunks.append((lo, rows))
        fixed = {k: packed_size(max(need[k] for need in needs), m) for k, m in zip(SIDES, multiples)}
        fixed["read"] = round_up(len(read.tokens), READ_MULTIPLE)
        logprob = np.zeros(len(examples), np.float64)
        with self.lock:
            hidden = self._stream(read_id, read)
            pending = [(lo, rows, logprob_from_stream(d.trainable, d.base, hidden,
                                                      pack_batch(rows, 1, sizes=lambda need: fixed),
                                                      cfg=d.cfg, lcfg=d.lcfg)) for lo, rows in chunks]
            for lo, rows, out in pending:
                owners, values = target_examples(rows, 1)[0], np.asarray(out)[0]
                n = len(rows["decoder_tokens"])
                logprob[lo: lo + n] = np.bincount(owners, weights=values[: len(owners)], minlength=n)
        pair = logprob.reshape(-1, 2).astype(np.float64)
        p_yes = 1.0 / (1.0 + np.exp(pair[:, 1] - pair[:, 0]))
        return {"question": question.strip(), "yes": yes, "no": no,
                "scores": [{"index": int(p), "text": d.tokenizer.decode([int(read.tokens[p])]), "p_yes": float(s)}
                           for p, s in zip(read.positions, p_yes)]}

    # ------------------------------------------------------------------ steering

    def steer(self, req: dict) -> dict:
        """The target's reply to a user prompt without and with a steering result named at start.

        req: "prompt" (str), "steering" (a name from info()["steering"]). Returns {"prompt",
        "steering", "plain", "steered"} (greedy, limits.steer_max_new_tokens each).
        RequestError for an empty or over-long prompt, or an unknown steering name.
        """
        prompt = _field(req, "prompt", str, required=True)
        if not prompt.strip():
            raise RequestError("prompt", "is empty")
        if len(prompt) > self.limits.max_prompt_chars:
            raise RequestError("prompt", f"{len(prompt)} characters, more than the limit max_prompt_chars="
                               f"{self.limits.max_prompt_chars}")
        name = _field(req, "steering", str, required=True)
        if name not in self.steering:
            known = sorted(self.steering) or "none (start the server with --config.serve.steering)"
            raise RequestError("steering", f"{name!r} is not loaded; loaded: {known}")
        d = self.decoder
        with self.lock:
            plain, steered = (chat(d.base, d.cfg, d.tokenizer, [prompt], sampling=self.steer_sampling, seed=self.seed,
                                   steering=s)[0] for s in (None, self.steering[name].steering))
        return {"prompt": prompt, "steering": name, "plain": plain, "steered": steered}
