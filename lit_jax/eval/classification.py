"""Sentence classification in the Activation Oracles protocol (Karvonen et al. 2025,
"Activation Oracles", their classification evaluation), on ../shared/data/classification.

Each sentence is one user turn of the target's chat template; the decoder reads the
activation of the last `num_tokens` tokens of that turn's content (default 1: the token
before the end-of-turn markup) and answers a yes/no question. Half the questions of each
class are the negated question, so the right answer is Yes for half the items and No for
the other half whatever the class balance: a decoder that always says Yes scores 50%.
Scored two ways: P(Yes) > P(No) under the decoder (no generation), and the generated answer's
first yes/no word. Datasets the decoder never trained on (no record of the file in its
training split) measure generalisation to unseen tasks. Baseline: the majority answer.
"""

from __future__ import annotations

import csv
import os
import re
import zlib
from typing import NamedTuple, Sequence

import numpy as np

from lit_jax.data.chat import render, span_positions
from lit_jax.eval import stats
from lit_jax.eval.controls import Variant
from lit_jax.generate import SamplingConfig
from lit_jax.lit.read import Read, Reader


class YesNoTask(NamedTuple):
    """A binary dataset as yes/no questions: `question` is answered Yes for the classes in
    `positive`, `negated` is answered Yes for the others."""

    text_column: str
    class_column: str
    question: str
    negated: str
    positive: frozenset


_TRUE = ("statement", "label", "Is this statement true?", "Is this statement false?", frozenset({"1"}))
YES_NO_TASKS: dict[str, YesNoTask] = {
    "engels_21_headline_istrump": YesNoTask("prompt", "target", "Is this headline about Donald Trump?",
                                            "Is this headline not about Donald Trump?", frozenset({"True"})),
    "engels_22_headline_isobama": YesNoTask("prompt", "target", "Is this headline about Barack Obama?",
                                            "Is this headline not about Barack Obama?", frozenset({"True"})),
    "engels_23_headline_ischina": YesNoTask("prompt", "target", "Is this headline about China?",
                                            "Is this headline not about China?", frozenset({"True"})),
    "engels_5_hist_fig_ismale": YesNoTask("prompt", "target", "Is this historical figure a man?",
                                          "Is this historical figure a woman?", frozenset({"1"})),
    "gmt_cities": YesNoTask(*_TRUE),
    "gmt_companies_true_false": YesNoTask(*_TRUE),
    "gmt_larger_than": YesNoTask(*_TRUE),
    "gmt_smaller_than": YesNoTask(*_TRUE),
    "gmt_sp_en_trans": YesNoTask(*_TRUE),
    "singular_plural_singular_plural": YesNoTask("sentence", "n_subjects", "Does the sentence have a single subject?",
                                                 "Does the sentence have multiple subjects?", frozenset({"single"})),
}


class YesNoItem(NamedTuple):
    read: Read
    question: str
    answer: str  # "Yes" or "No"
    dataset: str


def load_rows(path: str, task: YesNoTask) -> list[tuple[str, bool]]:
    """(sentence, is positive class) per usable row of a classification CSV."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        text = (row.get(task.text_column) or "").strip()
        value = (row.get(task.class_column) or "").strip()
        if text and value:
            out.append((text, value in task.positive))
    return out


def user_turn_read(tokenizer, sentence: str, num_tokens: int = 1) -> Read:
    """The sentence as one user turn (no generation prompt); read positions: the last
    `num_tokens` tokens of its content, i.e. ending at the token before the end of turn.
    ValueError when the template does not write the sentence verbatim."""
    text = render(tokenizer, [{"role": "user", "content": sentence}], False)
    start = text.rfind(sentence)
    if start < 0:
        raise ValueError(f"the chat template does not write the sentence verbatim: {sentence[:60]!r}")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    positions = span_positions(np.asarray(enc["offset_mapping"]), start, start + len(sentence))
    if positions.size == 0:
        raise ValueError(f"no tokens in the sentence {sentence[:60]!r}")
    return np.asarray(enc["input_ids"], np.int32), positions[-num_tokens:].astype(np.int32)


def make_items(tokenizer, data_dir: str, datasets: Sequence[str], per_dataset: int, *, num_tokens: int = 1,
               seed: int = 0) -> list[YesNoItem]:
    """per_dataset items of each dataset: half positive-class sentences, half negative; within
    each class half asked the negated question (so Yes/No answers are balanced). Seeded.
    ValueError for a dataset without a yes/no task (see YES_NO_TASKS)."""
    items = []
    for name in datasets:
        if name not in YES_NO_TASKS:
            raise ValueError(f"classification dataset {name!r} has no yes/no task; known: {sorted(YES_NO_TASKS)}")
        task = YES_NO_TASKS[name]
        rows = load_rows(os.path.join(data_dir, "classification", f"{name}.csv"), task)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        for positive in (True, False):
            pool = [r for r in rows if r[1] == positive]
            chosen = [pool[i] for i in rng.permutation(len(pool))[: per_dataset // 2]]
            for j, (sentence, _) in enumerate(chosen):
                negated = j % 2 == 1
                question = task.negated if negated else task.question
                answer = "Yes" if positive != negated else "No"
                items.append(YesNoItem(user_turn_read(tokenizer, sentence, num_tokens), question, answer, name))
    return items


_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def generated_answer(text: str) -> str | None:
    """The first yes/no word of a generated answer, capitalised, or None."""
    m = _WORD.search(text)
    return m.group(1).capitalize() if m else None


def classify(variant: Variant, items: Sequence[YesNoItem], *, layer=None, batch_size: int = 16, seed: int = 0,
             generate: bool = True, max_new_tokens: int = 6) -> dict:
    """Per item: right by P(Yes) > P(No), and (generate) right by the generated answer; with
    intervals, per dataset and overall, and the majority baseline."""
    reads = variant.reads([it.read for it in items], [str(i) for i in range(len(items))], seed)  # another sentence
    questions = [it.question for it in items]
    lp = variant.reader.score(reads, questions, [("Yes", "No")] * len(items), layer=layer, batch_size=batch_size,
                              text_only=variant.text_only)
    by_prob = np.asarray([(p[0] > p[1]) == (it.answer == "Yes") for p, it in zip(lp, items)], float)
    result = {"by_probability": _by_dataset(by_prob, items)}
    if generate:
        reader = variant.reader
        short = Reader(reader.base, reader.trainable, reader.cfg, reader.lcfg, reader.tokenizer, reader.data_cfg,
                       sampling=SamplingConfig(max_new_tokens=max_new_tokens))
        answers = []
        for lo in range(0, len(items), batch_size):
            answers += short.ask(reads[lo: lo + batch_size], questions[lo: lo + batch_size], layer=layer,
                                 text_only=variant.text_only)
        by_gen = np.asarray([generated_answer(a) == it.answer for a, it in zip(answers, items)], float)
        result["by_generation"] = _by_dataset(by_gen, items)
        result["examples"] = [{"dataset": it.dataset, "question": it.question, "answer": it.answer, "generated": a}
                              for it, a in list(zip(items, answers))[:6]]
    yes = np.mean([it.answer == "Yes" for it in items])
    result["majority"] = float(max(yes, 1 - yes))
    return result


def _by_dataset(correct: np.ndarray, items: Sequence[YesNoItem]) -> dict:
    names = sorted({it.dataset for it in items})
    per = {n: stats.accuracy(correct[[it.dataset == n for it in items]]) for n in names}
    return {"overall": stats.accuracy(correct), "datasets": per}
