"""The record: (read dialog or text, which span of it is read, question, answer, label).

Every source (LatentQA files, relation and classification tasks, users' JSONL files)
becomes a list of `Record`s; everything after that is source-agnostic. The read span is
given in template-independent terms (a first turn; or a character range of plain
text) so the same record renders correctly for any tokenizer's chat template.

JSONL (one record per line; see the README):
  {"label": str, "question": str, "answer": str,
   "dialog": [{"role": ..., "content": ...}, ...],   # a chat read ...
   "read_from_turn": int (default 0), "generation_prompt": bool (default: last role != "assistant"),
   "text": str, "read_chars": [start, end],          # ... or a plain-text read (exactly one of the two)
   "read_last": int (default 0)}                      # > 0: only the last n tokens of the read content
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterable, Iterator

from lit_jax.data.errors import BadRecords, DataError

ROLES = ("system", "user", "assistant")
JSONL_FIELDS = {"label", "question", "answer", "dialog", "text", "read_from_turn", "generation_prompt", "read_chars",
                "read_last"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One training/evaluation example before tokenization.

    A chat read (`dialog`) reads turns `read_from_turn`.. to the end of the rendered dialog
    (role headers and end-of-turn markup included; plus the generation header when
    `generation_prompt`). A plain-text read (`text`) reads the tokens overlapping
    `read_chars` (default: all of it). read_last > 0 narrows the read to the last `read_last`
    tokens of the content: of the final turn's content for a chat read (so not its end-of-turn
    markup: Activation Oracles' "token before the end of turn"), of the read_chars span for a
    plain-text read. `source`/`index` say where it came from.
    """

    label: str
    question: str
    answer: str
    dialog: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    read_from_turn: int = 0
    generation_prompt: bool = True
    text: str | None = None
    read_chars: tuple[int, int] | None = None
    read_last: int = 0
    source: str = ""
    index: int = -1

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.dialog or ()]

    def read_description(self) -> dict[str, Any]:
        """The read part as JSON-able data (for printing and for the tfds store)."""
        if self.dialog is not None:
            d: dict[str, Any] = {"dialog": self.messages, "read_from_turn": self.read_from_turn,
                                 "generation_prompt": self.generation_prompt}
        else:
            d = {"text": self.text}
            if self.read_chars is not None:
                d["read_chars"] = list(self.read_chars)
        if self.read_last:
            d["read_last"] = self.read_last
        return d


def check_record(r: Record) -> str | None:
    """Why `r` is unusable (None if fine): the invariants every reader must meet."""
    for name in ("label", "question", "answer"):
        if not isinstance(getattr(r, name), str) or not getattr(r, name).strip():
            return f"field {name!r} is missing or empty"
    if not isinstance(r.read_last, int) or r.read_last < 0:
        return f"read_last={r.read_last!r} must be a non-negative integer (0: the whole read span)"
    if (r.dialog is None) == (r.text is None):
        return "exactly one of 'dialog' and 'text' must be given"
    if r.dialog is not None:
        if not r.dialog:
            return "'dialog' is empty"
        for i, (role, content) in enumerate(r.dialog):
            if role not in ROLES:
                return f"dialog turn {i} has role {role!r}; expected one of {ROLES}"
            if not isinstance(content, str):
                return f"dialog turn {i} content is not a string"
        if not 0 <= r.read_from_turn < len(r.dialog):
            return f"read_from_turn={r.read_from_turn} is outside the dialog's {len(r.dialog)} turns"
        if r.generation_prompt and r.dialog[-1][0] == "assistant":
            return "generation_prompt=true after a final assistant turn"
    else:
        if not isinstance(r.text, str) or not r.text.strip():
            return "'text' is missing, empty or not a string"
        if r.read_chars is not None:
            a, b = r.read_chars
            if not 0 <= a < b <= len(r.text):
                return f"read_chars={list(r.read_chars)} is not a non-empty range inside the text"
    return None


def record_from_json(obj: Any, source: str, index: int) -> Record:
    """A JSONL line's object -> Record; raises DataError (naming file and record) when invalid."""
    try:
        return parse_record(obj, source, index)
    except ValueError as e:
        raise DataError(f"{source}: record {index}: {e}") from None


def parse_record(obj: Any, source: str = "", index: int = -1) -> Record:
    """A JSON object -> Record; ValueError saying what is wrong (without the location)."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    unknown = set(obj) - JSONL_FIELDS
    if unknown:
        raise ValueError(f"unknown field(s) {sorted(unknown)}; allowed: {sorted(JSONL_FIELDS)}")
    missing = [k for k in ("label", "question", "answer") if k not in obj]
    if missing:
        raise ValueError(f"missing field(s) {missing}")
    dialog = obj.get("dialog")
    if dialog is not None:
        if not isinstance(dialog, list) or not all(
            isinstance(t, dict) and {"role", "content"} <= set(t) and isinstance(t["content"], str) for t in dialog
        ):
            raise ValueError("'dialog' must be a list of {\"role\": str, \"content\": str} objects")
        dialog = tuple((t["role"], t["content"].strip()) for t in dialog)
    read_chars = obj.get("read_chars")
    if read_chars is not None and not (isinstance(read_chars, list) and len(read_chars) == 2):
        raise ValueError("'read_chars' must be [start, end]")
    r = Record(
        label=_text(obj["label"]),
        question=_text(obj["question"]),
        answer=_text(obj["answer"]),
        dialog=dialog,
        read_from_turn=int(obj.get("read_from_turn", 0)),
        generation_prompt=bool(obj.get("generation_prompt", bool(dialog) and dialog[-1][0] != "assistant")),
        text=obj.get("text"),
        read_chars=tuple(int(c) for c in read_chars) if read_chars is not None else None,
        read_last=obj.get("read_last", 0),
        source=source,
        index=index,
    )
    problem = check_record(r)
    if problem:
        raise ValueError(problem)
    return r


def _text(v: Any) -> Any:
    return v.strip() if isinstance(v, str) else v


def record_to_json(r: Record) -> dict[str, Any]:
    """Record -> the JSONL object (inverse of record_from_json, minus source/index)."""
    d: dict[str, Any] = {"label": r.label, "question": r.question, "answer": r.answer}
    d.update(r.read_description())
    return d


def read_jsonl(path: str, bad: BadRecords, display: str | None = None) -> list[Record]:
    """Records of a JSONL file; blank lines are ignored, record index = 0-based line number."""
    display = display or path
    records = []
    for index, line in _lines(path, display):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            bad.report(display, index, f"malformed JSON ({e.msg} at column {e.colno})")
            continue
        try:
            records.append(parse_record(obj, display, index))
        except ValueError as e:
            bad.report(display, index, str(e))
    return records


def _lines(path: str, display: str) -> Iterator[tuple[int, str]]:
    if not os.path.isfile(path):
        raise DataError(f"{display}: file not found")
    # utf-8-sig drops a byte-order mark; universal newlines make CRLF files read like LF ones.
    with open(path, encoding="utf-8-sig") as f:
        lines = [(i, line) for i, line in enumerate(f) if line.strip()]
    if not lines:
        raise DataError(f"{display}: empty file (no records)")
    return iter(lines)


def write_jsonl(records: Iterable[Record], path: str) -> int:
    """Write records in our JSONL format; returns how many were written."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(record_to_json(r), ensure_ascii=False) + "\n")
            n += 1
    return n
