"""The read side: render a record with the tokenizer's chat template, find its read span.

Spans come from the rendered text, never from per-model token counts. The dialog is also
rendered with each turn's content replaced by a sentinel, which shows where the template put
every turn (it must write each exactly once, in order, verbatim):
- turn k > 0 starts where turn k-1 ends: after what the template writes behind turn k-1's
  content when the dialog stops there (its end-of-turn markup). Every earlier turn must lie
  before that point. A template that writes an earlier turn only together with a later one
  (Llama 2 and Mistral merge the system prompt into a user turn) cannot mask it, and the read
  is refused, never read silently. Templates that render history differently from the last
  turn (Qwen3's think block) are fine: only turn k-1's ending is compared.
- turn 0 starts at its role header, found by probing the template for that role's header.
  This skips whatever the template puts before the first turn: a BOS token, or a default
  system prompt (SmolLM2, Qwen2, Llama 3.1+ insert one).
The BOS token opening the sequence is never read (Llama 2 writes it as part of the first
user turn's header); later ones that open a turn are read with their header, like ChatML's
<|im_start|>, which SmolLM2 also uses as BOS.
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
    last: int = 0  # > 0: only the last `last` tokens of the span are read


def render(tokenizer: Any, messages: Sequence[dict[str, str]], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError("the tokenizer has no chat template; chat reads and decoder prompts need one")
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja raise_exception(...) and friends: the template refuses this dialog
        raise TemplateError(f"the chat template cannot render this dialog: {e}") from None


def _turn_sentinel(i: int) -> str:
    return f"\x00lit-turn-{i}\x00"


def _layout(tokenizer: Any, roles: Sequence[str], generation_prompt: bool) -> tuple[str, list[int | None]]:
    """The dialog with turn i's content replaced by a sentinel, rendered; each sentinel's offset
    (None where the template leaves the turn out). TemplateError if it writes a turn twice."""
    text = render(tokenizer, [{"role": r, "content": _turn_sentinel(i)} for i, r in enumerate(roles)],
                  generation_prompt)
    at: list[int | None] = []
    for i, role in enumerate(roles):
        n = text.count(_turn_sentinel(i))
        if n > 1:
            raise TemplateError(f"the chat template writes turn {i} ({role}) {n} times")
        at.append(text.index(_turn_sentinel(i)) if n else None)
    return text, at


def _turn_end(tokenizer: Any, roles: Sequence[str], last: int) -> str:
    """What the template writes after turn `last`'s content when the dialog ends with that turn."""
    text, at = _layout(tokenizer, roles[: last + 1], False)
    missing = [i for i, a in enumerate(at) if a is None]
    if missing:
        i = missing[0]
        raise TemplateError(
            f"the chat template does not write turn {i} ({roles[i]}) unless a later turn follows: it merges that "
            "turn into a later turn's block (as Llama 2 and Mistral do with a system prompt), so the turn cannot be "
            "masked out of a read that starts after it")
    return text[at[last] + len(_turn_sentinel(last)):]


@functools.lru_cache(maxsize=64)
def role_header(tokenizer: Any, role: str) -> str:
    """The text a template writes before a `role` turn's content (e.g. '<|im_start|>user\\n').

    Probed with the role in a later turn, where nothing but the previous turn's end and the
    header precede the content (a first turn may be preceded by BOS or a default system prompt).
    """
    context = ("user",) if role == "assistant" else ("user", "assistant")
    try:
        full, at = _layout(tokenizer, context + (role,), False)
        tail = _turn_end(tokenizer, context, len(context) - 1)
    except TemplateError:
        if role != "system":
            raise
        return _first_system_header(tokenizer)
    if at[-1] is None or at[-2] is None:
        raise TemplateError(f"cannot find the {role!r} turn header: the template leaves the probe turn out")
    glue = full[at[-2] + len(_turn_sentinel(len(context) - 1)): at[-1]]
    if not glue.startswith(tail):
        raise TemplateError(f"cannot find the {role!r} turn header: the turn before it ends differently when a "
                            f"{role!r} turn follows")
    return glue[len(tail):]


def _first_system_header(tokenizer: Any) -> str:
    """For templates that only allow a system turn first: what precedes its content, minus BOS."""
    full = render(tokenizer, [{"role": "system", "content": _SENTINEL}, {"role": "user", "content": "a"}], False)
    head = full[: full.index(_SENTINEL)]
    bos = getattr(tokenizer, "bos_token", None)
    return head[len(bos):] if bos and head.startswith(bos) and len(head) > len(bos) else head


def turn_start(tokenizer: Any, messages: Sequence[dict[str, str]], k: int, generation_prompt: bool
               ) -> tuple[str, int]:
    """(rendered dialog, character offset where turn k's block begins); TemplateError saying why
    the template cannot give a read from turn k with turns [0, k) masked out."""
    roles = tuple(m["role"] for m in messages)
    text = render(tokenizer, messages, generation_prompt)
    layout, at = _layout(tokenizer, roles, generation_prompt)
    for i, a in enumerate(at):
        if a is None:
            raise TemplateError(f"the chat template leaves turn {i} ({roles[i]}) out of the rendered dialog")
    filled = layout
    for i, m in enumerate(messages):
        filled = filled.replace(_turn_sentinel(i), m["content"])
    if filled != text:
        raise TemplateError("the chat template rewrites turn contents (e.g. strips or splits them); read spans "
                            "need each turn's text verbatim")
    if k == 0:
        header = role_header(tokenizer, roles[0])
        start = at[0] - len(header)
        if start < 0 or layout[start: at[0]] != header:
            raise TemplateError(f"turn 0 ({roles[0]}) is not preceded by its header {header!r}: the template writes "
                                "its own text into that turn")
    else:
        tail = _turn_end(tokenizer, roles, k - 1)
        end = at[k - 1] + len(_turn_sentinel(k - 1))
        if not layout.startswith(tail, end) or end + len(tail) > at[k]:
            raise TemplateError(f"turn {k - 1} ({roles[k - 1]}) ends differently when turn {k} follows; cannot place "
                                f"turn {k}")
        start = end + len(tail)
    inside = [i for i in range(k) if at[i] >= start]
    if inside:
        raise TemplateError(f"the chat template writes turn {inside[0]} ({roles[inside[0]]}) after turn {k} begins; "
                            "it would be read although it is masked")
    outside = [j for j in range(k, len(roles)) if at[j] < start]
    if outside:
        raise TemplateError(f"the chat template writes turn {outside[0]} ({roles[outside[0]]}) before turn {k} begins; "
                            "the read span would miss it")
    bos = getattr(tokenizer, "bos_token", None)
    if start == 0 and bos and layout.startswith(bos) and len(bos) <= at[k]:
        start = len(bos)  # the sequence-opening BOS (an attention sink) is never read
    shift = sum(len(messages[i]["content"]) - len(_turn_sentinel(i)) for i in range(k))
    return text, start + shift


def read_text(tokenizer: Any, record: Record) -> ReadText:
    """The text the target reads and the character span of it whose activations are taken."""
    if record.text is not None:
        start, end = record.read_chars or (0, len(record.text))
        return ReadText(record.text, start, end, True, record.read_last)
    text, start = turn_start(tokenizer, record.messages, record.read_from_turn, record.generation_prompt)
    if not record.read_last:
        return ReadText(text, start, len(text), False)
    content = record.dialog[-1][1]  # the final turn's content, written verbatim (turn_start checked)
    at = text.rfind(content, start)
    if at < 0 or not content:
        raise TemplateError("read_last: the final turn's content is not in the read span")
    return ReadText(text, at, at + len(content), False, record.read_last)


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
            positions = span_positions(np.asarray(enc["offset_mapping"][j]), reads[i].start, reads[i].end)
            out[i] = (np.asarray(enc["input_ids"][j], np.int32), positions[-reads[i].last:] if reads[i].last else positions)
    return out  # type: ignore[return-value]


def tokenize_read(tokenizer: Any, dialog_or_text: Sequence[dict[str, str]] | str, *, read_from_turn: int = 0,
                  generation_prompt: bool | None = None, read_chars: tuple[int, int] | None = None,
                  read_last: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(read_tokens, read_positions) for an arbitrary dialog (list of messages) or plain text.

    For the reading API: the same rules as training records (see the module docstring);
    read_last > 0: only the last read_last tokens of the final turn's content (or of the text's
    read_chars span), as Record.read_last.
    """
    if isinstance(dialog_or_text, str):
        record = Record(label="-", question="-", answer="-", text=dialog_or_text, read_chars=read_chars,
                        read_last=read_last)
    else:
        dialog = tuple((m["role"], m["content"].strip()) for m in dialog_or_text)
        gen = (bool(dialog) and dialog[-1][0] != "assistant") if generation_prompt is None else generation_prompt
        record = Record(label="-", question="-", answer="-", dialog=dialog, read_from_turn=read_from_turn,
                        generation_prompt=gen, read_last=read_last)
    problem = check_record(record)
    if problem:
        raise ValueError(problem)
    tokens, positions = tokenize_reads(tokenizer, [read_text(tokenizer, record)])[0]
    if positions.size == 0:
        raise ValueError("the read span holds no tokens")
    return tokens, positions
