"""The decoder side: prompt styles, placeholder slots, answer loss mask.

The decoder dialog is rendered once per (tokenizer, style, layer) with sentinel strings in
place of the variable parts (the placeholders, the acknowledgement, the question, the
answer). An example is that text with the parts filled in, tokenized as a whole, so its
tokens are the ones the model meets in any other use of its template (SentencePiece's
word-initial "▁", merges across a part boundary). Character spans of the parts then give
the write positions (exactly S placeholder tokens, checked) and the loss mask.

The generation prompt is the training text cut where the answer begins, so generation sees
what training saw before the answer, including what a template writes only before a final
answer (Qwen3's empty think block). Where the template puts a space between the turn header
and the answer ("[/INST] answer": Llama 2, Mistral) and the tokenizer folds that space into
the answer's first token, the cut is before the space, which then belongs to the answer.

Styles (the answer is always the final assistant turn):
  latentqa  [user: <S placeholders>] [assistant: acknowledgement] [user: question] [assistant: answer]
  oracle    [user: "Layer: {L}\\n" + <S placeholders> + "\\n" + question] [assistant: answer]
            several layers at once (data.read_all_layers): "Layer: {L1}\\n" + <S> + "\\n" + "Layer: {L2}\\n"
            + <S> + "\\n" + ... + question, one placeholder run per layer read
Loss (targets): the answer tokens and the template's end-of-turn token after them (the first
special token after the answer; the sequence ends there). With train_on_acknowledgement,
also the acknowledgement and its end-of-turn token (as the reference did).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple, Sequence

import numpy as np

from lit_jax.data.chat import TemplateError, render
from lit_jax.data.errors import log

SLOTS, ACK, QUESTION, ANSWER = "slots", "ack", "question", "answer"
_SENT = {k: f"\x00lit-{k}\x00" for k in (SLOTS, ACK, QUESTION, ANSWER)}
_SPLIT = re.compile("\x00lit-(slots\\d*|ack|question|answer)\x00")


def slots_kind(run: int) -> str:
    """The part name of placeholder run `run` (one run per layer read; the first is SLOTS)."""
    return SLOTS if run == 0 else f"{SLOTS}{run}"


def as_layers(layer: int | Sequence[int]) -> tuple[int, ...]:
    return (int(layer),) if isinstance(layer, (int, np.integer)) else tuple(int(x) for x in layer)
_PROBE_QUESTION, _PROBE_ANSWERS = "What is it?", ("It is a test.", "Yes", "42", "(b) a pirate")

# "auto" placeholder: the first that is a single special token of the tokenizer (reserved/unused
# tokens never occur in text); " ?" (Activation Oracles' choice) is the last resort.
PLACEHOLDER_CANDIDATES = (
    "<|reserved_special_token_0|>",  # Llama-3
    "<empty_output>",  # SmolLM2 / StarCoder vocabularies
    "<|fim_pad|>",  # Qwen2 / Qwen2.5 / Qwen3
    "[control_8]",  # Mistral v0.3 (unused control tokens)
    "<unused0>",  # Gemma
)
PLACEHOLDER_FALLBACK = " ?"


class Filled(NamedTuple):
    text: str  # the decoder dialog with its parts filled in
    spans: dict  # part kind -> (start, end) character offsets in text


class DecoderPrompt(NamedTuple):
    tokens: np.ndarray  # int32 [n]: the prompt, ending with the assistant generation header
    write_positions: np.ndarray  # int32 [S]
    generation_start: int  # == len(tokens): where the answer is generated


def special_ids(tokenizer: Any) -> frozenset[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
    return frozenset(ids)


def encode(tokenizer: Any, text: str) -> np.ndarray:
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], np.int32).reshape(-1)


def _placeholder_id(tokenizer: Any, text: str) -> int | None:
    """The token id `text` becomes when repeated inside other text, if it is one token each time."""
    base, ids = encode(tokenizer, "."), encode(tokenizer, "." + text * 3)
    if len(ids) == len(base) + 3 and np.array_equal(ids[: len(base)], base) and len(set(ids[len(base):])) == 1:
        return int(ids[-1])
    return None


def resolve_placeholder(tokenizer: Any, spec: str = "auto") -> tuple[str, int]:
    """(placeholder text, token id): `spec` itself, or the "auto" choice.

    The placeholder must become exactly one token each time it is repeated inside text (as the
    slots are); "auto" takes the first candidate that is a special token of the tokenizer, else
    " ?". Raises ValueError when no candidate (or `spec`) qualifies.
    """
    specials = special_ids(tokenizer)
    if spec != "auto":
        pid = _placeholder_id(tokenizer, spec)
        if pid is None:
            raise ValueError(f"placeholder_token {spec!r} does not tokenize to one token per repetition for this "
                             "tokenizer; it must")
        return spec, pid
    for text in PLACEHOLDER_CANDIDATES:
        pid = _placeholder_id(tokenizer, text)
        if pid is not None and pid in specials:
            return text, pid
    pid = _placeholder_id(tokenizer, PLACEHOLDER_FALLBACK)
    if pid is None:
        raise ValueError(f"no single-token placeholder among {PLACEHOLDER_CANDIDATES + (PLACEHOLDER_FALLBACK,)}; "
                         "set data.placeholder_token")
    return PLACEHOLDER_FALLBACK, pid


def decoder_messages(style: str, acknowledgement: str, layer: int | Sequence[int], with_answer: bool
                     ) -> list[dict[str, str]]:
    """The decoder dialog with sentinels for its parts; `layer` is one read layer, or several
    (oracle style only: one "Layer: L" line and placeholder run each)."""
    layers = as_layers(layer)
    if style == "latentqa":
        if len(layers) > 1:
            raise ValueError(f"reading several layers at once ({layers}) needs prompt_style='oracle'")
        msgs = [{"role": "user", "content": _SENT[SLOTS]}, {"role": "assistant", "content": _SENT[ACK]},
                {"role": "user", "content": _SENT[QUESTION]}]
    elif style == "oracle":
        runs = "".join(f"Layer: {L}\n\x00lit-{slots_kind(i)}\x00\n" for i, L in enumerate(layers))
        msgs = [{"role": "user", "content": runs + _SENT[QUESTION]}]
    else:
        raise ValueError(f"prompt_style={style!r}; expected 'latentqa' or 'oracle'")
    return msgs + ([{"role": "assistant", "content": _SENT[ANSWER]}] if with_answer else [])


def _first_special(ids: np.ndarray, specials: frozenset) -> int | None:
    """Index in `ids` of the first special token (the end-of-turn marker), None if there is none."""
    hits = [i for i, t in enumerate(ids.tolist()) if t in specials]
    return hits[0] if hits else None


def template_end_of_turn_id(tokenizer: Any) -> int | None:
    """The token id the chat template writes to end an assistant turn (<|im_end|>, <|eot_id|>, </s>, ...).

    Probed as DecoderFormat does: the first special token after an assistant message's content
    in a rendered [user, assistant] dialog. None when the tokenizer has no chat template, the
    template refuses the probe dialog, or no special token follows the assistant content.
    Raises nothing.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": _SENT[ANSWER]}]
    try:
        pieces = _SPLIT.split(render(tokenizer, msgs, False))
    except TemplateError:
        return None
    if len(pieces) != 3:  # the template dropped or repeated the assistant content
        return None
    after = encode(tokenizer, pieces[2])
    at = _first_special(after, special_ids(tokenizer))
    return None if at is None else int(after[at])


def _boundary(offsets: np.ndarray, pos: int) -> int | None:
    """Number of tokens before character `pos`, or None if a token straddles it."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    if ((starts < pos) & (ends > pos)).any():
        return None
    return int((starts < pos).sum())


def _encode_with_offsets(tokenizer: Any, texts: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    if not texts:
        return []
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(i, np.int32).reshape(-1), np.asarray(o, np.int64).reshape(-1, 2))
            for i, o in zip(enc["input_ids"], enc["offset_mapping"])]


@dataclasses.dataclass(frozen=True)
class DecoderFormat:
    """Builds decoder sequences for one tokenizer, prompt style and placeholder."""

    style: str
    placeholder: str
    placeholder_id: int
    acknowledgement: str
    train_on_acknowledgement: bool
    tokenizer: Any = dataclasses.field(repr=False, compare=False)
    specials: frozenset = dataclasses.field(default=frozenset(), repr=False, compare=False)
    _cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def create(cls, tokenizer: Any, cfg: Any) -> "DecoderFormat":
        """Raises TemplateError when the chat template cannot give a decoder prompt (saying why)."""
        text, pid = resolve_placeholder(tokenizer, cfg.placeholder_token)
        fmt = cls(cfg.prompt_style, text, pid, cfg.acknowledgement.strip(), bool(cfg.train_on_acknowledgement),
                  tokenizer, special_ids(tokenizer))
        layer = tuple(cfg.read_layers) if cfg.get("read_all_layers", False) else int(cfg.read_layers[0])
        fmt.answer_cut(layer)  # validate the template now, not at the first example
        fmt.check_natural(layer)
        return fmt

    def pieces(self, layer: int | Sequence[int]) -> tuple[str, ...]:
        """The rendered training dialog split at its parts: glue, kind, glue, kind, ..., glue."""
        key = ("pieces", as_layers(layer))
        if key not in self._cache:
            msgs = decoder_messages(self.style, self.acknowledgement, layer, True)
            pieces = tuple(_SPLIT.split(render(self.tokenizer, msgs, False)))
            kinds = list(pieces[1::2])
            runs = [slots_kind(i) for i in range(len(as_layers(layer)))]
            want = [SLOTS, ACK, QUESTION, ANSWER] if self.style == "latentqa" else [*runs, QUESTION, ANSWER]
            if kinds != want:
                raise TemplateError(f"the chat template reorders or drops decoder parts: got {kinds}, expected {want}")
            if any(self.placeholder in glue for glue in pieces[::2]):
                raise TemplateError(f"placeholder {self.placeholder!r} occurs in the chat template itself; "
                                    "choose another (data.placeholder_token)")
            self._cache[key] = pieces
        return self._cache[key]

    def fill(self, layer: int | Sequence[int], num_slots: int, question: str, answer: str,
             slot_text: str | None = None) -> Filled:
        """The decoder text of one example (num_slots placeholders per layer run) and its parts' spans.
        slot_text: this text in place of each placeholder run instead (the text-only control:
        the decoder reads the text itself, no activation is written)."""
        values = {ACK: self.acknowledgement, QUESTION: question, ANSWER: answer}
        run = self.placeholder * num_slots if slot_text is None else slot_text
        values.update({slots_kind(i): run for i in range(len(as_layers(layer)))})
        out, spans, n = [], {}, 0
        for i, piece in enumerate(self.pieces(layer)):
            if i % 2:
                kind, piece = piece, values[piece]
                spans[kind] = (n, n + len(piece))
            out.append(piece)
            n += len(piece)
        return Filled("".join(out), spans)

    def answer_cut(self, layer: int | Sequence[int]) -> int:
        """How many characters before the answer the generation prompt ends: 0, or the length of
        the whitespace the template writes before the answer when the tokenizer folds it into the
        answer's first token. Probed once per layer; raises TemplateError if neither works or no
        special end-of-turn token follows the answer."""
        key = ("cut", as_layers(layer))
        if key not in self._cache:
            glue = self.pieces(layer)[-3]  # the glue before the answer (pieces end: ..., glue, ANSWER, glue)
            space = len(glue) - len(glue.rstrip())
            filled = [self.fill(layer, 3, _PROBE_QUESTION, a) for a in _PROBE_ANSWERS]
            encoded = _encode_with_offsets(self.tokenizer, [f.text for f in filled])
            cut = None
            for candidate in dict.fromkeys((0, space)):
                if all(_boundary(off, f.spans[ANSWER][0] - candidate) is not None
                       for f, (_, off) in zip(filled, encoded)):
                    cut = candidate
                    break
            if cut is None:
                raise TemplateError("the tokenizer merges the answer's first token with the template text before it; "
                                    "no generation prompt gives the tokens training sees")
            for f, (ids, off) in zip(filled, encoded):
                if self._end_of_turn(ids, off, f.spans[ANSWER][1]) is None:
                    raise TemplateError("no special end-of-turn token follows the assistant turn in the chat template")
            self._cache[key] = cut
        return self._cache[key]

    def _end_of_turn(self, ids: np.ndarray, offsets: np.ndarray, after: int) -> int | None:
        """Index of the first special token starting at or after character `after`."""
        specials = self.specials or special_ids(self.tokenizer)
        hits = [j for j in np.flatnonzero(offsets[:, 0] >= after).tolist() if int(ids[j]) in specials]
        return hits[0] if hits else None

    def examples(self, items: Sequence[tuple[int, str, str, int]], slot_texts: Sequence[str | None] | None = None
                 ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | str]:
        """For each (num_slots, question, answer, layer or layers): (decoder_tokens int32 [T],
        write_positions int32 [runs * S], loss_mask bool [T]), or a string saying why the example cannot be built. Two
        batched tokenizer calls (full texts, prompts). slot_texts[i] (not None): that text in
        place of item i's placeholders and no write positions (see `fill`)."""
        texts = list(slot_texts) if slot_texts is not None else [None] * len(items)
        filled = [self.fill(layer, s, q, a, t) for (s, q, a, layer), t in zip(items, texts)]
        cuts = [f.spans[ANSWER][0] - self.answer_cut(layer) for f, (_, _, _, layer) in zip(filled, items)]
        full = _encode_with_offsets(self.tokenizer, [f.text for f in filled])
        prompts = _encode_with_offsets(self.tokenizer, [f.text[:c] for f, c in zip(filled, cuts)])
        out: list = []
        for (s, _, _, _), f, cut, (ids, off), (p_ids, p_off), t in zip(items, filled, cuts, full, prompts, texts):
            write = self._slots(p_ids, p_off, f.spans, s) if t is None else np.zeros(0, np.int32)
            b = _boundary(off, cut)
            eot = self._end_of_turn(ids, off, f.spans[ANSWER][1])
            if isinstance(write, str) or b is None or eot is None:
                out.append(write if isinstance(write, str) else
                           "the answer's first token merges with the template text before it" if b is None else
                           "no end-of-turn token after the answer")
                continue
            if not np.array_equal(ids[:b], p_ids):
                self._warn_once("the decoder prompt tokenizes differently alone than inside the training text; "
                                "training uses the prompt's own tokens, so training and generation agree")
            tokens = np.concatenate([p_ids, ids[b: eot + 1]]).astype(np.int32)
            loss = np.zeros(len(tokens), bool)
            loss[len(p_ids):] = True
            if self.train_on_acknowledgement:
                first = int(np.argmax((p_off[:, 1] > f.spans[ACK][0]) & (p_off[:, 0] < f.spans[ACK][1])))
                end = self._end_of_turn(p_ids, p_off, f.spans[ACK][1])
                loss[first: (end if end is not None else first) + 1] = True
            out.append((tokens, write, loss))
        return out

    def _slots(self, ids: np.ndarray, offsets: np.ndarray, spans: dict, num_slots: int) -> np.ndarray | str:
        """Write positions int32 [runs * S]: each placeholder run's tokens, in run (= layer) order."""
        out = []
        for run in range(sum(k.startswith(SLOTS) for k in spans)):
            lo, hi = spans[slots_kind(run)]
            at = np.flatnonzero((offsets[:, 1] > lo) & (offsets[:, 0] < hi)).astype(np.int32)
            if len(at) != num_slots or (ids[at] != self.placeholder_id).any():
                return (f"{num_slots} placeholders {self.placeholder!r} tokenize to {len(at)} tokens in the "
                        "template, not one each; set data.placeholder_token to a special token")
            out.append(at)
        return np.concatenate(out)

    def _warn_once(self, message: str) -> None:
        if not self._cache.get(("warned", message)):
            self._cache[("warned", message)] = True
            log.warning(message)

    def example(self, num_slots: int, question: str, answer: str, layer: int | Sequence[int]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(decoder_tokens [T], write_positions [S], loss_mask [T]) for one example; ValueError if it cannot be built."""
        [ex] = self.examples([(num_slots, question, answer, layer)])
        if isinstance(ex, str):
            raise ValueError(ex)
        return ex

    def prompt(self, num_slots: int, question: str, layer: int | Sequence[int], slot_text: str | None = None
               ) -> DecoderPrompt:
        """The decoder prompt for generation: slots, question, the template up to where the answer
        begins. slot_text: the text-only form (see `fill`; no write positions)."""
        f = self.fill(layer, num_slots, question, "", slot_text)
        cut = f.spans[ANSWER][0] - self.answer_cut(layer)
        [(ids, off)] = _encode_with_offsets(self.tokenizer, [f.text[:cut]])
        if slot_text is not None:
            return DecoderPrompt(ids, np.zeros(0, np.int32), len(ids))
        write = self._slots(ids, off, f.spans, num_slots)
        if isinstance(write, str):
            raise TemplateError(write)
        return DecoderPrompt(ids, write, len(ids))

    def check_natural(self, layer: int | Sequence[int], question: str = _PROBE_QUESTION, answer: str = _PROBE_ANSWERS[0]) -> bool:
        """Whether an example's tokens are exactly those of tokenizing its whole text (up to the
        answer's end-of-turn token); warns if not. They differ only where the generation prompt
        tokenizes differently alone than inside the longer text; training then uses the prompt's
        own tokens, so training and generation still agree."""
        tokens, _, _ = self.example(3, question, answer, layer)
        [(natural, _)] = _encode_with_offsets(self.tokenizer, [self.fill(layer, 3, question, answer).text])
        if np.array_equal(natural[: len(tokens)], tokens):
            return True
        n = min(len(natural), len(tokens))
        at = int(np.argmax(natural[:n] != tokens[:n])) if (natural[:n] != tokens[:n]).any() else n
        log.warning("decoder tokens differ from tokenizing the rendered template (first at token %d): the tokenizer "
                    "merges across the end of the generation prompt. Training and generation stay consistent.", at)
        return False

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends the assistant answer (stop token for generation)."""
        layer = next((k[1] for k in self._cache if k[0] == "pieces"), (0,))
        tokens, _, _ = self.example(3, _PROBE_QUESTION, _PROBE_ANSWERS[0], layer)
        return int(tokens[-1])


def decoder_prompt(tokenizer: Any, data_cfg: Any, question: str, num_slots: int,
                   layer: int | Sequence[int] | None = None, fmt: DecoderFormat | None = None) -> DecoderPrompt:
    """Decoder token ids + write positions (+ generation start) for a new question about S
    activations per layer read (write positions: S per layer, in layer order)."""
    if num_slots <= 0:
        raise ValueError(f"num_slots={num_slots}: there must be at least one activation to write")
    fmt = fmt or DecoderFormat.create(tokenizer, data_cfg)
    if layer is None:
        layer = tuple(data_cfg.read_layers) if data_cfg.get("read_all_layers", False) else data_cfg.read_layers[0]
    p = fmt.prompt(num_slots, question.strip(), layer)
    assert len(p.write_positions) == num_slots * len(as_layers(layer))
    return p
