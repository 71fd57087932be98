"""The decoder side: prompt styles, placeholder slots, answer loss mask — by token-id concatenation.

The decoder dialog is rendered once per (tokenizer, style, layer) with sentinel strings in
place of the variable parts; the text between sentinels ("glue": role headers, end-of-turn
markup, a default system prompt, "Layer: 15\\n") is tokenized once. An example is then
glue + [placeholder] * S + glue + question ids + glue + answer ids + end-of-turn, so there
are exactly S slots whatever the tokenizer would have merged, and no template re-rendering
per example.

Styles (the answer is always the final assistant turn):
  latentqa  [user: <S placeholders>] [assistant: acknowledgement] [user: question] [assistant: answer]
  oracle    [user: "Layer: {L}\\n" + <S placeholders> + "\\n" + question] [assistant: answer]
Loss (targets): the answer tokens and the template's end-of-turn token after them (the first
special token of the glue after the answer; the sequence ends there). With
train_on_acknowledgement, also the acknowledgement and its end-of-turn token (as the
reference did).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, NamedTuple

import numpy as np

from lit_jax.data.chat import TemplateError, render
from lit_jax.data.errors import log

SLOTS, ACK, QUESTION, ANSWER = "slots", "ack", "question", "answer"
_SENT = {k: f"\x00lit-{k}\x00" for k in (SLOTS, ACK, QUESTION, ANSWER)}
_SPLIT = re.compile("\x00lit-(slots|ack|question|answer)\x00")

# "auto" placeholder: the first that is a single special token of the tokenizer (reserved/unused
# tokens never occur in text); " ?" (Activation Oracles' choice) is the last resort.
PLACEHOLDER_CANDIDATES = (
    "<|reserved_special_token_0|>",  # Llama-3
    "<empty_output>",  # SmolLM2 / StarCoder vocabularies
    "<|fim_pad|>",  # Qwen2
    "<unused0>",  # Gemma
)
PLACEHOLDER_FALLBACK = " ?"


class Part(NamedTuple):
    kind: str  # "text" or one of SLOTS/ACK/QUESTION/ANSWER
    ids: np.ndarray  # token ids of text parts and of the (constant) acknowledgement


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


def resolve_placeholder(tokenizer: Any, spec: str = "auto") -> tuple[str, int]:
    """(placeholder text, token id): `spec` itself, or the "auto" choice; must be one token."""
    candidates = PLACEHOLDER_CANDIDATES if spec == "auto" else (spec,)
    specials = special_ids(tokenizer)
    for text in candidates:
        ids = encode(tokenizer, text)
        if len(ids) == 1 and (spec != "auto" or int(ids[0]) in specials):
            return text, int(ids[0])
    if spec == "auto":
        ids = encode(tokenizer, PLACEHOLDER_FALLBACK)
        if len(ids) == 1:
            return PLACEHOLDER_FALLBACK, int(ids[0])
        raise ValueError(f"no single-token placeholder among {PLACEHOLDER_CANDIDATES + (PLACEHOLDER_FALLBACK,)}; "
                         "set data.placeholder_token")
    raise ValueError(f"placeholder_token {spec!r} is {len(ids)} tokens for this tokenizer; it must be exactly one")


def decoder_messages(style: str, acknowledgement: str, layer: int, with_answer: bool) -> list[dict[str, str]]:
    if style == "latentqa":
        msgs = [{"role": "user", "content": _SENT[SLOTS]}, {"role": "assistant", "content": _SENT[ACK]},
                {"role": "user", "content": _SENT[QUESTION]}]
    elif style == "oracle":
        msgs = [{"role": "user", "content": f"Layer: {layer}\n{_SENT[SLOTS]}\n{_SENT[QUESTION]}"}]
    else:
        raise ValueError(f"prompt_style={style!r}; expected 'latentqa' or 'oracle'")
    return msgs + ([{"role": "assistant", "content": _SENT[ANSWER]}] if with_answer else [])


def template_parts(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool, ack_ids: np.ndarray
                   ) -> list[Part]:
    pieces = _SPLIT.split(render(tokenizer, messages, generation_prompt))
    parts = []
    for i, piece in enumerate(pieces):
        if i % 2 == 0:
            parts.append(Part("text", encode(tokenizer, piece)))
        else:
            parts.append(Part(piece, ack_ids if piece == ACK else np.zeros(0, np.int32)))
    return parts


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


@dataclasses.dataclass(frozen=True)
class DecoderFormat:
    """Assembles decoder sequences for one tokenizer, prompt style and placeholder."""

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
        text, pid = resolve_placeholder(tokenizer, cfg.placeholder_token)
        fmt = cls(cfg.prompt_style, text, pid, cfg.acknowledgement.strip(), bool(cfg.train_on_acknowledgement),
                  tokenizer, special_ids(tokenizer))
        fmt.parts(int(cfg.read_layers[0]))  # validate the template now, not at the first example
        fmt.check_natural(int(cfg.read_layers[0]))
        return fmt

    def check_natural(self, layer: int, question: str = "What is it?", answer: str = "It is a test.") -> bool:
        """Warn if concatenation differs from tokenizing the whole rendered dialog.

        Training and generation both concatenate, so they agree either way; a difference only
        means the tokenizer merges across a template/content boundary, e.g. a GPT-2-style split
        after a template's "\\n\\n" (Llama-3's own split keeps "\\n\\n" whole).
        """
        tokens, _, _ = self.example(3, encode(self.tokenizer, question), encode(self.tokenizer, answer), layer)
        text = render(self.tokenizer, decoder_messages(self.style, self.acknowledgement, layer, True), False)
        for key, value in ((SLOTS, self.placeholder * 3), (ACK, self.acknowledgement), (QUESTION, question),
                           (ANSWER, answer)):
            text = text.replace(_SENT[key], value)
        natural = encode(self.tokenizer, text)[: len(tokens)]
        if np.array_equal(natural, tokens):
            return True
        n = min(len(natural), len(tokens))
        at = int(np.argmax(natural[:n] != tokens[:n])) if (natural[:n] != tokens[:n]).any() else n
        log.warning("decoder token concatenation differs from tokenizing the rendered template (first at token %d); "
                    "the tokenizer merges across a template boundary. Training and generation stay consistent.", at)
        return False

    def parts(self, layer: int) -> tuple[list[Part], list[Part]]:
        """(training parts with the answer, generation-prompt parts), checked, cached per layer."""
        if layer not in self._cache:
            ack_ids = encode(self.tokenizer, self.acknowledgement)
            train = template_parts(self.tokenizer, decoder_messages(self.style, self.acknowledgement, layer, True),
                                   False, ack_ids)
            prompt = template_parts(self.tokenizer, decoder_messages(self.style, self.acknowledgement, layer, False),
                                    True, ack_ids)
            self._check(train, prompt)
            self._cache[layer] = (train, prompt)
        return self._cache[layer]

    def _check(self, train: list[Part], prompt: list[Part]) -> None:
        kinds = [p.kind for p in train if p.kind != "text"]
        want = [SLOTS, ACK, QUESTION, ANSWER] if self.style == "latentqa" else [SLOTS, QUESTION, ANSWER]
        if kinds != want:
            raise TemplateError(f"the chat template reorders or drops decoder parts: got {kinds}, expected {want}")
        if any(self.placeholder_id in p.ids for p in train if p.kind == "text"):
            raise TemplateError(f"placeholder {self.placeholder!r} occurs in the chat template itself; choose another")
        a = kinds.index(ANSWER) * 2 + 1  # parts alternate text / variable
        for i in [a] + ([kinds.index(ACK) * 2 + 1] if self.train_on_acknowledgement else []):
            if self._end_of_turn(train[i + 1].ids) is None:
                raise TemplateError("no special end-of-turn token follows the assistant turn in the chat template")
        same = len(prompt) == a and all(
            p.kind == t.kind and np.array_equal(p.ids, t.ids) for p, t in zip(prompt, train[:a]))
        if not same:
            raise TemplateError("the template's generation prompt differs from its training rendering before the "
                                "answer; training and generation would see different prompts")

    def _end_of_turn(self, ids: np.ndarray) -> int | None:
        """Index in `ids` of the first special token (the end-of-turn marker)."""
        return _first_special(ids, self.specials or special_ids(self.tokenizer))

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends the assistant answer (stop token for generation)."""
        train = (next(iter(self._cache.values())) if self._cache else self.parts(0))[0]
        after = train[[p.kind for p in train].index(ANSWER) + 1].ids
        return int(after[self._end_of_turn(after)])

    def example(self, num_slots: int, question_ids: np.ndarray, answer_ids: np.ndarray, layer: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(decoder_tokens [T], write_positions [S], loss_mask [T]) for one training example."""
        train, _ = self.parts(layer)
        segments, losses = [], []
        write, pending, n = np.zeros(0, np.int32), None, 0
        for part in train:
            if part.kind == "text":
                ids, mask = part.ids, np.zeros(len(part.ids), bool)
                if pending is not None:  # the target turn's end-of-turn token is a target too
                    eot = self._end_of_turn(ids)
                    mask[: eot + 1] = True
                    if pending == ANSWER:  # nothing after the answer's end-of-turn affects the loss
                        ids, mask = ids[: eot + 1], mask[: eot + 1]
                pending = None
            elif part.kind == SLOTS:
                ids, mask = np.full(num_slots, self.placeholder_id, np.int32), np.zeros(num_slots, bool)
                write = np.arange(n, n + num_slots, dtype=np.int32)
            elif part.kind == QUESTION:
                ids, mask = question_ids, np.zeros(len(question_ids), bool)
            else:  # ACK or ANSWER
                target = part.kind == ANSWER or self.train_on_acknowledgement
                ids = answer_ids if part.kind == ANSWER else part.ids
                mask, pending = np.full(len(ids), target), (part.kind if target else None)
            segments.append(np.asarray(ids, np.int32))
            losses.append(mask)
            n += len(ids)
        return np.concatenate(segments), write, np.concatenate(losses)

    def prompt(self, num_slots: int, question_ids: np.ndarray, layer: int) -> DecoderPrompt:
        """The decoder prompt for generation: slots, question, assistant header (no answer)."""
        _, parts = self.parts(layer)
        segments, write, n = [], None, 0
        for part in parts:
            if part.kind == SLOTS:
                ids = np.full(num_slots, self.placeholder_id, np.int32)
                write = np.arange(n, n + num_slots, dtype=np.int32)
            else:
                ids = question_ids if part.kind == QUESTION else part.ids
            segments.append(np.asarray(ids, np.int32))
            n += len(ids)
        tokens = np.concatenate(segments)
        return DecoderPrompt(tokens, write, len(tokens))


def decoder_prompt(tokenizer: Any, data_cfg: Any, question: str, num_slots: int, layer: int | None = None,
                   fmt: DecoderFormat | None = None) -> DecoderPrompt:
    """Decoder token ids + write positions (+ generation start) for a new question about S activations."""
    if num_slots <= 0:
        raise ValueError(f"num_slots={num_slots}: there must be at least one activation to write")
    fmt = fmt or DecoderFormat.create(tokenizer, data_cfg)
    layer = int(data_cfg.read_layers[0]) if layer is None else int(layer)
    p = fmt.prompt(num_slots, encode(tokenizer, question.strip()), layer)
    assert len(p.write_positions) == num_slots
    return p
