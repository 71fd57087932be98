"""Held-out LatentQA: answer loss and token accuracy, multiple choice with the prior removed,
and the hidden system prompt.

Multiple choice (the decoder as a scorer, no generation, no judge): a group of k held-out
examples with k different labels. Entry (i, j) of the group's score matrix is
log P(answer_j | read_i, question_j): the decoder's log-likelihood of example j's answer to
example j's question, given example i's activations. A candidate's prior is its mean
log-likelihood over the group's reads; read i picks the candidate with the largest
log-likelihood minus prior, and is right when that is its own. Removing the prior keeps
a candidate that is likely whatever is read (short, generic) from winning everywhere:
the choice then rests on what the activations change. Ties count 1/(number tied).
Chance is 1/k.

  multiple_choice   groups share one question (so candidates are other labels' answers
                    to the same question, e.g. the persona questions), any read kind
  hidden_system     reads of eval/system.json only: the system turn (persona or goal) is
                    masked, the user turn is read; candidates are the k labels' own
                    question-answer pairs
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple, Sequence

import numpy as np

from lit_jax.data import tokenize_read
from lit_jax.eval import stats
from lit_jax.eval.controls import Variant
from lit_jax.lit.read import Read

SYSTEM_SOURCE = "latentqa/eval/system.json"


class Item(NamedTuple):
    """One held-out example: the read, its question and true answer, its label and source file."""

    read: Read
    question: str
    answer: str
    label: str
    source: str


def item_of(tokenizer, described: dict) -> Item:
    """An Item from ExampleSource.describe(i) (the read re-tokenized from its description)."""
    r = described["read"]
    if "dialog" in r:
        read = tokenize_read(tokenizer, r["dialog"], read_from_turn=r["read_from_turn"],
                             generation_prompt=r["generation_prompt"], read_last=r.get("read_last", 0))
    else:
        read = tokenize_read(tokenizer, r["text"], read_chars=tuple(r["read_chars"]) if "read_chars" in r else None,
                             read_last=r.get("read_last", 0))
    return Item(read, described["question"], described["answer"], described["label"], described["source"])


def heldout_items(source, tokenizer, *, contains: str = "", limit: int = 0, seed: int = 0) -> list[Item]:
    """Items of a held-out ExampleSource whose source file contains `contains`; at most `limit`
    (0: all), a seeded sample spread over labels (one per label first, then seconds, ...)."""
    described = [source.describe(i) for i in range(len(source))]
    chosen = [d for d in described if contains in d["source"]]
    rng = np.random.default_rng(seed)
    rng.shuffle(chosen)
    seen: dict[str, int] = defaultdict(int)
    ranked = []
    for d in chosen:
        ranked.append((seen[d["label"]], len(ranked), d))
        seen[d["label"]] += 1
    ranked.sort(key=lambda t: (t[0], t[1]))
    picked = [d for _, _, d in ranked][: limit or None]
    return [item_of(tokenizer, d) for d in picked]


def answer_loss(variant: Variant, items: Sequence[Item], *, layer=None, batch_size: int = 16, seed: int = 0
                ) -> dict:
    """Token-weighted answer loss (nats/token) and token accuracy of the variant on the items'
    own answers, with bootstrap intervals over items."""
    reads = variant.reads([it.read for it in items], [it.label for it in items], seed)
    ex = variant.reader.examples(reads, [it.question for it in items], [it.answer for it in items], layer=layer,
                                 text_only=variant.text_only)
    s = variant.reader.score_examples(ex, batch_size=batch_size)
    return {"loss": stats.bootstrap_ratio(-s.logprob, s.tokens, seed=seed),
            "token_accuracy": stats.bootstrap_ratio(s.correct, s.tokens, seed=seed)}


def choice_scores(logp: np.ndarray) -> np.ndarray:
    """Per read, credit in [0, 1] for picking its own candidate from a [k, k] score matrix
    (rows: reads, columns: candidates; the diagonal is right) after removing each
    candidate's prior (its column mean). Ties share the credit."""
    logp = np.asarray(logp, np.float64)
    if logp.ndim != 2 or logp.shape[0] != logp.shape[1] or logp.shape[0] < 2:
        raise ValueError(f"expected a square score matrix with k >= 2, got shape {logp.shape}")
    adjusted = logp - logp.mean(axis=0, keepdims=True)
    best = adjusted.max(axis=1, keepdims=True)
    tied = np.isclose(adjusted, best, rtol=0, atol=1e-6)
    return tied[np.arange(len(logp)), np.arange(len(logp))] / tied.sum(axis=1)


def make_groups(items: Sequence[Item], k: int, *, same_question: bool, seed: int = 0) -> list[list[int]]:
    """Groups of k item indices with k different labels (and one question, if same_question);
    each item in at most one group; seeded. Items left over are not used."""
    if k < 2:
        raise ValueError(f"k={k}: a choice needs at least 2 candidates")
    rng = np.random.default_rng(seed)
    pools: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        pools[it.question if same_question else ""].append(i)
    groups = []
    for key in sorted(pools):
        pool = [pools[key][j] for j in rng.permutation(len(pools[key]))]
        while True:
            group, labels = [], set()
            for i in pool:
                if items[i].label not in labels:
                    group.append(i)
                    labels.add(items[i].label)
                    if len(group) == k:
                        break
            if len(group) < k:
                break
            groups.append(group)
            pool = [i for i in pool if i not in group]
    return groups


def choice_credit(variant: Variant, items: Sequence[Item], groups: Sequence[Sequence[int]], *, layer=None,
                  batch_size: int = 16, seed: int = 0) -> dict[int, float]:
    """{item index: credit in [0, 1]} for picking each grouped read's own candidate (see the
    module docstring). Shuffled variants read another label's activations (drawn over all items)."""
    if not groups:
        raise ValueError("no groups of k examples with different labels: too few held-out examples")
    reads = variant.reads([it.read for it in items], [it.label for it in items], seed)
    rows = [(i, j) for g in groups for i in g for j in g]
    ex = variant.reader.examples([reads[i] for i, _ in rows], [items[j].question for _, j in rows],
                                 [items[j].answer for _, j in rows], layer=layer, text_only=variant.text_only)
    logprob = variant.reader.score_examples(ex, batch_size=batch_size).logprob
    credit, at = {}, 0
    for g in groups:
        k = len(g)
        credit.update(zip(g, choice_scores(logprob[at: at + k * k].reshape(k, k)).tolist()))
        at += k * k
    return credit


def choice_task(variant: Variant, items: Sequence[Item], groups: Sequence[Sequence[int]], *, layer=None,
                batch_size: int = 16, seed: int = 0) -> dict:
    """Accuracy (with interval over reads) of picking each read's own candidate in each group."""
    credit = choice_credit(variant, items, groups, layer=layer, batch_size=batch_size, seed=seed)
    k = len(groups[0])
    return {"accuracy": stats.accuracy(list(credit.values())), "chance": 1.0 / k, "k": k, "groups": len(groups)}


def hidden_system(variant: Variant, items: Sequence[Item], k: int, *, pairs: int = 2, layer=None,
                  batch_size: int = 16, seed: int = 0) -> dict:
    """Which of k personas/goals, from system-prompt reads (one label per read). Each read is
    tested with up to `pairs` of its label's QA pairs (a fresh random grouping each), and its
    credit is the mean: a steadier score per read, the interval still over reads."""
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        by_label[it.label].append(i)
    per_read: dict[str, list[float]] = defaultdict(list)
    for p in range(pairs):
        chosen = [ids[p] for ids in by_label.values() if len(ids) > p]
        sub = [items[i] for i in chosen]
        groups = make_groups(sub, k, same_question=False, seed=seed + p)
        if not groups:
            continue
        for i, c in choice_credit(variant, sub, groups, layer=layer, batch_size=batch_size, seed=seed + p).items():
            per_read[sub[i].label].append(c)
    if not per_read:
        raise ValueError(f"no groups of {k} system-prompt reads with different labels: too few held-out reads")
    return {"accuracy": stats.accuracy([float(np.mean(v)) for v in per_read.values()]), "chance": 1.0 / k, "k": k}
