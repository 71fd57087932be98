"""The `read` task of the command line: load a trained decoder, ask it about reads given in a
JSONL file or by flags, print a table and write JSONL (configs/read.py documents the fields)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from ml_collections import ConfigDict

from lit_jax.config_checks import check_read_settings
from lit_jax.data import tokenize_read
from lit_jax.data.records import parse_record
from lit_jax.generate import SamplingConfig
from lit_jax.lit.read import each_token
from lit_jax.lit.trained import load_decoder


def read_requests(r: ConfigDict) -> list[dict[str, Any]]:
    """[{"read": dialog list or text str, "read_from_turn", "read_chars", "question", "answer" (or None)}].

    From `r.input` (JSONL, the training record format with `label`/`answer` optional) or from
    `r.dialog`/`r.text` + `r.questions`. ValueError naming the flag, file and line otherwise."""
    given = [k for k in ("input", "dialog", "text") if r[k]]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --config.read.input, .dialog, .text (got {given or 'none'})")
    if r.input:
        if not os.path.isfile(r.input):
            raise FileNotFoundError(f"--config.read.input={r.input}: file not found")
        out = []
        with open(r.input, encoding="utf-8-sig") as f:
            for line_no, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                    rec = parse_record({"label": "-", **obj, "answer": obj.get("answer") or "-"}, r.input, line_no)
                except (json.JSONDecodeError, ValueError) as e:
                    raise ValueError(f"{r.input}: line {line_no + 1}: {e}") from None
                out.append({"read": rec.text if rec.text is not None else rec.messages,
                            "read_from_turn": rec.read_from_turn, "read_chars": rec.read_chars,
                            "generation_prompt": rec.generation_prompt if rec.dialog else None,
                            "question": rec.question, "answer": obj.get("answer")})
        if not out:
            raise ValueError(f"--config.read.input={r.input}: no records")
        return out
    if not r.questions:
        raise ValueError("--config.read.questions is empty: give at least one question")
    if r.dialog:
        try:
            read = json.loads(r.dialog)
        except json.JSONDecodeError as e:
            raise ValueError(f"--config.read.dialog is not JSON: {e}") from None
        if not isinstance(read, list):
            raise ValueError("--config.read.dialog must be a JSON list of {\"role\", \"content\"} turns")
    else:
        read = r.text
    return [{"read": read, "read_from_turn": r.read_from_turn, "read_chars": None, "generation_prompt": None,
             "question": q, "answer": None} for q in r.questions]


def _shorten(read: Any, width: int = 60, first: int = 0) -> str:
    """A one-line view of a read; turns before `first` (masked, not read) shown as such."""
    if isinstance(read, str):
        text = read
    else:
        masked = f"[{first} masked turn(s): {', '.join(t['role'] for t in read[:first])}] " if first else ""
        text = masked + " | ".join(f"{t['role']}: {t['content']}" for t in read[first:])
    return text if len(text) <= width else text[: width - 1] + "…"


def run_read(config: ConfigDict, workdir: str) -> list[dict]:
    r = config.read
    check_read_settings(r)  # an impossible size fails before the decoder loads, naming its flag
    if not config.decoder:
        raise ValueError("--config.decoder is empty: give the work dir of a `lit` run")
    requests = read_requests(r)  # bad input fails before the model loads
    decoder = load_decoder(config.decoder, step=None if config.decoder_step < 0 else int(config.decoder_step),
                           target=config.target or None)
    reader = decoder.reader(SamplingConfig(r.max_new_tokens, r.temperature, r.top_k))
    layer = None if r.layer < 0 else int(r.layer)
    rows = []
    for i, q in enumerate(requests):
        try:
            read = tokenize_read(decoder.tokenizer, q["read"], read_from_turn=q["read_from_turn"],
                                 read_chars=q["read_chars"], generation_prompt=q["generation_prompt"])
        except ValueError as e:
            raise ValueError(f"read {i} ({_shorten(q['read'])!r}): {e}") from None
        units = [(read, None)] if r.each_token_last <= 0 else [
            (single, decoder.tokenizer.decode([int(single[0][single[1][0]])]))
            for single in each_token(read, r.each_token_last)]
        for one, token in units:
            rows.append({"read": q["read"], "read_from_turn": q["read_from_turn"] if not isinstance(q["read"], str)
                         else None, "question": q["question"], "true_answer": q["answer"], "token": token,
                         "_read": one})
    for lo in range(0, len(rows), r.batch_size):
        chunk = rows[lo: lo + r.batch_size]
        answers = reader.ask([c["_read"] for c in chunk], [c["question"] for c in chunk], layer=layer,
                             seed=config.seed + lo)
        for c, a in zip(chunk, answers):
            c["answer"] = a
        if r.candidates:
            scores = reader.score([c["_read"] for c in chunk], [c["question"] for c in chunk],
                                  [list(r.candidates)] * len(chunk), layer=layer)
            for c, s in zip(chunk, scores):
                c["scores"] = {cand: float(v) for cand, v in zip(r.candidates, s)}
        print(f"read {min(lo + r.batch_size, len(rows))}/{len(rows)}", flush=True)
    for c in rows:
        c.pop("_read")
    print_table(rows)
    out = r.output or os.path.join(config.decoder, "reads.jsonl")
    with open(out, "w", encoding="utf-8") as f:
        for c in rows:
            f.write(json.dumps({k: v for k, v in c.items() if v is not None}, ensure_ascii=False) + "\n")
    print(f"\nwrote {len(rows)} answers to {out} (decoder {decoder.path}, step {decoder.step})", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    for i, c in enumerate(rows):
        print(f"\n[{i}] read:     {_shorten(c['read'], 100, c.get('read_from_turn') or 0)}"
              + (f"   token: {c['token']!r}" if c["token"] else ""))
        print(f"    question: {c['question']}\n    answer:   {c['answer']}")
        if c.get("true_answer"):
            print(f"    true:     {c['true_answer']}")
        if c.get("scores"):
            best = max(c["scores"], key=c["scores"].get)
            shown = ", ".join(f"{k}: {v:.2f}" for k, v in c["scores"].items())
            print(f"    log p:    {shown}  (best: {best})")
