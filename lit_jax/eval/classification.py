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

from lit_jax.data import tokenize_read
from lit_jax.data.readers import TASKS, YES_NO, yes_no_answer
from lit_jax.eval import stats
from lit_jax.eval.controls import Variant
from lit_jax.generate import SamplingConfig
from lit_jax.lit.read import Read, Reader


class YesNoItem(NamedTuple):
    read: Read
    question: str
    answer: str  # "Yes" or "No"
    dataset: str
    sentence: str = ""
    positive: bool = False  # the sentence's class is one the plain question answers Yes for


def load_rows(path: str, name: str) -> list[tuple[str, str]]:
    """(sentence, class value) per usable row of a classification CSV (columns from readers.TASKS)."""
    task = TASKS[name]
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.DictReader(f))
    out = []
    for row in rows:
        text = (row.get(task.text_column) or "").strip()
        value = (row.get(task.class_column) or "").strip()
        if text and value:
            out.append((text, value))
    return out


def user_turn_read(tokenizer, sentence: str, num_tokens: int = 1) -> Read:
    """The sentence as one user turn (no generation prompt); read positions: the last
    `num_tokens` tokens of its content, i.e. ending at the token before the end of turn
    (lit_jax.data.tokenize_read with read_last, as training's classification_read="user_turn")."""
    return tokenize_read(tokenizer, [{"role": "user", "content": sentence}], generation_prompt=False,
                         read_last=num_tokens)


def make_items(tokenizer, data_dir: str, datasets: Sequence[str], per_dataset: int, *, num_tokens: int = 1,
               seed: int = 0) -> list[YesNoItem]:
    """per_dataset items of each dataset: half positive-class sentences, half negative; within
    each class half asked the negated question (so Yes/No answers are balanced). Seeded.
    ValueError for a dataset without a yes/no task (lit_jax.data.readers.YES_NO)."""
    items = []
    for name in datasets:
        if name not in YES_NO:
            raise ValueError(f"classification dataset {name!r} has no yes/no task; known: {sorted(YES_NO)}")
        task = YES_NO[name]
        rows = load_rows(os.path.join(data_dir, "classification", f"{name}.csv"), name)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        for positive in (True, False):
            pool = [r for r in rows if (r[1] in task.positive) == positive]
            chosen = [pool[i] for i in rng.permutation(len(pool))[: per_dataset // 2]]
            for j, (sentence, value) in enumerate(chosen):
                negated = j % 2 == 1
                question = task.negated if negated else task.question
                items.append(YesNoItem(user_turn_read(tokenizer, sentence, num_tokens), question,
                                       yes_no_answer(task, value, negated), name, sentence, positive))
    return items


_WORD = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def generated_answer(text: str) -> str | None:
    """The first yes/no word of a generated answer, capitalised, or None."""
    m = _WORD.search(text)
    return m.group(1).capitalize() if m else None


def classify(variant: Variant, items: Sequence[YesNoItem], *, layer=None, batch_size: int = 16, seed: int = 0,
             generate: bool = True, max_new_tokens: int = 6) -> dict:
    """Per item: right by P(Yes) > P(No), and (generate) right by the generated answer; with
    intervals, per dataset and overall ("correct": the per-item 0/1 array), and the majority
    baseline."""
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
        # One batch: a few new tokens each, and one compiled generation instead of one per length bucket.
        answers = short.ask(reads, questions, layer=layer, text_only=variant.text_only)
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
    return {"overall": stats.accuracy(correct), "datasets": per, "correct": correct}


def probe_by_layer(params, cfg, tokenizer, data_dir: str, items: Sequence[YesNoItem], layers: Sequence[int], *,
                   train_per_dataset: int = 64, seed: int = 0, batch_size: int = 32) -> list[dict]:
    """Accuracy vs read layer of a linear probe (Alain & Bengio 2016) on the same activation the
    decoder reads (the last token of the sentence as a user turn): per dataset, a logistic
    regression (scikit-learn) on `train_per_dataset` other sentences of that dataset (class
    balanced, disjoint from the items) predicting the class, scored on the items' sentences.
    Rows {"layer", "probe": {"accuracy"}, "majority": {"accuracy": 0.5}} (the items are class
    balanced), for lit_jax.eval.relations.plot_by_layer."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from lit_jax.eval.relations import activations_at

    names = sorted({it.dataset for it in items})
    train: list[tuple[str, str, bool]] = []
    for name in names:
        used = {it.sentence for it in items if it.dataset == name}
        rows = [(s, v) for s, v in load_rows(os.path.join(data_dir, "classification", f"{name}.csv"), name)
                if s not in used]
        rng = np.random.default_rng([seed, 1, zlib.crc32(name.encode())])
        for positive in (True, False):
            pool = [s for s, v in rows if (v in YES_NO[name].positive) == positive]
            train += [(name, pool[i], positive) for i in rng.permutation(len(pool))[: train_per_dataset // 2]]
    sentences = [s for _, s, _ in train] + [it.sentence for it in items]
    reads = [user_turn_read(tokenizer, s, 1) for s in sentences]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    acts = activations_at(params, cfg, [t for t, _ in reads], np.asarray([p[-1] for _, p in reads]), layers, pad,
                          batch_size)
    n_train = len(train)
    out = []
    for j, layer in enumerate(layers):
        correct = []
        for name in names:
            tr = [i for i, (n, _, _) in enumerate(train) if n == name]
            te = [n_train + i for i, it in enumerate(items) if it.dataset == name]
            model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
            model.fit(acts[tr, j], [train[i][2] for i in tr])
            truth = [items[i - n_train].positive for i in te]
            correct += (model.predict(acts[te, j]) == np.asarray(truth)).tolist()
        out.append({"layer": int(layer), "probe": {"accuracy": float(np.mean(correct))}, "majority": {"accuracy": 0.5}})
    return out
