"""The read side: render a record with the tokenizer's chat template, find its read span.

Spans come from the rendered text, never from per-model token counts:
- turn k > 0 starts where the template's own rendering of turns [0, k) ends (that prefix
  must be a prefix of the full rendering; templates that rewrite history are refused);
- turn 0 starts at its role header, found by probing the template for that role's header
  and locating header + content. This skips whatever the template puts before the first
  turn: a BOS token, or a default system prompt (SmolLM2 inserts one when the dialog does
  not start with a system turn).
The span runs to the end of the rendered text: the read turns with their role headers
and end-of-turn markup, plus the generation header when the record asks for one.
Characters map to tokens through the fast tokenizer's offsets (a token is read if it
overlaps the span; zero-width tokens such as an added BOS never are).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import numpy as np

from lit_jax.data.records import Record, check_record

_SENTINEL = "\x00lit-probe\x00"


class TemplateError(ValueError):
    """The chat template cannot render a dialog the way the read span needs."""


class ReadText(NamedTuple):
    text: str  # what the target model reads (rendered dialog, or plain text)
    start: int  # read span, as character offsets into text
    end: int
    add_special_tokens: bool  # plain text: the tokenizer's own BOS etc.; rendered chat: already in the text


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; chat reads and decoder prompts need one")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raise_exception(...) and friends: the template refuses this dialog
        raise TemplateError(f"the chat template cannot render this dialog: {e}") from None


@functools.lru_cache(maxsize=64)
def role_header(tokenizer: Any, role: str) -> str:
    """The text a template writes before a `role` turn's content (e.g. '<|im_start|>user\\n').

    Probed with the role in a later turn, where nothing but the header precedes the content
    (a first turn may be preceded by BOS or a default system prompt).
    """
    context = [{"role": "user", "content": "a"}] + ([] if role == "assistant" else [{"role": "assistant", "content": "b"}])
    try:
        before = render(tokenizer, context, False)
        full = render(tokenizer, context + [{"role": role, "content": _SENTINEL}], False)
    except TemplateError:
        if role != "system":
            raise
        return _first_system_header(tokenizer)
    if not full.startswith(before) or _SENTINEL not in full[len(before):]:
        raise TemplateError(f"cannot find the {role!r} turn header: the template is not append-only")
    return full[len(before): full.index(_SENTINEL, len(before))]


def _first_system_header(tokenizer: Any) -> str:
    """For templates that only allow a system turn first: what precedes its content, minus BOS."""
    full = render(tokenizer, [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "a"}], False)
    head = full[: full.index(_SENTINEL)]
    bos = getattr(tokenizer, "bos_token", None)
    return head[len(bos):] if bos and head.startswith(bos) and len(head) > len(bos) else head


def turn_start(tokenizer: Any, messages: Sequence[dict[str, str]], text: str, k: int) -> int:
    """Character offset in `text` (the rendered dialog) where turn k's role header begins."""
    header = role_header(tokenizer, messages[k]["role"])
    if k == 0:
        start = text.find(header + messages[0]["content"])
        if start < 0:
            raise TemplateError(f"cannot find turn 0 ({messages[0]['role']}) in the rendered dialog")
        return start
    prefix = render(tokenizer, messages[:k], False)
    if not text.startswith(prefix):
        raise TemplateError(f"turns [0, {k}) render differently inside the full dialog; cannot place turn {k}")
    if not text.startswith(header, len(prefix)):
        raise TemplateError(f"turn {k} does not start with its {messages[k]['role']!r} header {header!r}")
    return len(prefix)


def read_text(tokenizer: Any, record: Record) -> ReadText:
    """The text the target reads and the character span of it whose activations are taken."""
    if record.text is not None:
        start, end = record.read_chars or (0, len(record.text))
        return ReadText(record.text, start, end, True)
    messages = record.messages
    text = render(tokenizer, messages, record.generation_prompt)
    return ReadText(text, turn_start(tokenizer, messages, text, record.read_from_turn), len(text), False)


def span_positions(offsets: np.ndarray, start: int, end: int) -> np.ndarray:
    """Indices of the tokens (offsets [n, 2]) overlapping characters [start, end)."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    return np.flatnonzero((offsets[:, 0] < end) & (offsets[:, 1] > start) & (offsets[:, 1] > offsets[:, 0])).astype(
        np.int32)


def tokenize_reads(tokenizer: Any, reads: Sequence[ReadText]) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(read_tokens, read_positions)] for many reads, with one batched tokenizer call per kind."""
    out: list[tuple[np.ndarray, np.ndarray] | None] = [None] * len(reads)
    for special in (False, True):
        idx = [i for i, r in enumerate(reads) if r.add_special_tokens == special]
        if not idx:
            continue
        enc = tokenizer([reads[i].text for i in idx], add_special_tokens=special, return_offsets_mapping=True)
        for j, i in enumerate(idx):
            out[i] = (np.asarray(enc["input_ids"][j], np.int32),
                      span_positions(np.asarray(enc["offset_mapping"][j]), reads[i].start, reads[i].end))
    return out  # type: ignore[return-value]


def tokenize_read(tokenizer: Any, dialog_or_text: Sequence[dict[str, str]] | str, *, read_from_turn: int = 0,
                  generation_prompt: bool | None = None, read_chars: tuple[int, int] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(read_tokens, read_positions) for an arbitrary dialog (list of messages) or plain text.

    For the reading API: the same rules as training records (see the module docstring).
    """
    if isinstance(dialog_or_text, str):
        record = Record(label="-", question="-", answer="-", text=dialog_or_text, read_chars=read_chars)
    else:
        dialog = tuple((m["role"], m["content"].strip()) for m in dialog_or_text)
        gen = dialog[-1][0] != "assistant" if generation_prompt is None else generation_prompt
        record = Record(label="-", question="-", answer="-", dialog=dialog, read_from_turn=read_from_turn,
                        generation_prompt=gen)
    problem = check_record(record)
    if problem:
        raise ValueError(problem)
    tokens, positions = tokenize_reads(tokenizer, [read_text(tokenizer, record)])[0]
    if positions.size == 0:
        raise ValueError("the read span holds no tokens")
    return tokens, positions
