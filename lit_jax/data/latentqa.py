"""LatentQA behaviour files joined with qa.json by label -> Records (one per QA pair).

The read dialog and span per file kind (from the data README and the reference code):
  control              [user: control_user]                                   read from turn 0
  stimulus             [user: control_user, assistant: control_model,
                        user: stimulus_user]                                  read from turn 2
  system               [system: system, user: stimulus_user]                  read from turn 1
  stimulus_completion  stimulus + [assistant: stimulus_model] (teacher-forced) read from turn 2
All but stimulus_completion end with the generation header (the model is about to answer).
The kind is the file's name (control.json, stimulus.json, ...): explicit, and the fields
each kind needs are then checked per record.
"""

from __future__ import annotations

import os

from lit_jax.data.errors import BadRecords, DataError
from lit_jax.data.jsonfile import load_json
from lit_jax.data.records import Record

# kind -> (fields in dialog order with their roles, read_from_turn, generation_prompt)
KINDS: dict[str, tuple[tuple[tuple[str, str], ...], int, bool]] = {
    "control": ((("control_user", "user"),), 0, True),
    "stimulus": ((("control_user", "user"), ("control_model", "assistant"), ("stimulus_user", "user")), 2, True),
    "system": ((("system", "system"), ("stimulus_user", "user")), 1, True),
    "stimulus_completion": (
        (("control_user", "user"), ("control_model", "assistant"), ("stimulus_user", "user"),
         ("stimulus_model", "assistant")), 2, False),
}

QA = dict[str, list[tuple[str, str]]]


def latentqa_kind(path: str) -> str | None:
    """The LatentQA record kind of a behaviour file, from its name (None if not one)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem if stem in KINDS else None


def load_qa(path: str, display: str | None = None) -> QA:
    """qa.json: {label: [[question, answer], ...]} with every pair checked."""
    display = display or path
    data = load_json(path, display)
    if not isinstance(data, dict):
        raise DataError(f"{display}: expected an object {{label: [[question, answer], ...]}}")
    qa: QA = {}
    for label, pairs in data.items():
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) and s.strip() for s in p) for p in pairs
        ):
            raise DataError(f"{display}: label {label!r}: expected a list of [question, answer] string pairs")
        qa[label.strip()] = [(q.strip(), a.strip()) for q, a in pairs]
    return qa


def read_latentqa(path: str, qa: QA, bad: BadRecords, display: str | None = None, qa_display: str = "qa.json"
                  ) -> list[Record]:
    """Records of one behaviour file: one per (behaviour record, QA pair of its label)."""
    display = display or path
    kind = latentqa_kind(path)
    if kind is None:
        raise DataError(f"{display}: not a LatentQA behaviour file (expected one of {sorted(KINDS)}.json)")
    fields, read_from, gen = KINDS[kind]
    data = load_json(path, display)
    if not isinstance(data, list):
        raise DataError(f"{display}: expected a list of records")
    records = []
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            bad.report(display, index, f"expected an object, got {type(item).__name__}")
            continue
        missing = [f for f in ("label", *(f for f, _ in fields)) if not _nonempty(item.get(f))]
        if missing:
            bad.report(display, index, f"missing or empty field(s) {missing} (a {kind} record needs them)")
            continue
        label = item["label"].strip()
        if not qa.get(label):
            bad.report(display, index, f"label {label!r} has no QA pairs in {qa_display}")
            continue
        dialog = tuple((role, item[f].strip()) for f, role in fields)
        for question, answer in qa[label]:
            records.append(Record(label=label, question=question, answer=answer, dialog=dialog,
                                  read_from_turn=read_from, generation_prompt=gen, source=display, index=index))
    return records


def _nonempty(v: object) -> bool:
    return isinstance(v, str) and bool(v.strip())
