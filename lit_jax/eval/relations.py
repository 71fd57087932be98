"""Relational-knowledge extraction: a trained LIT decoder against a linear probe and Patchscope.

    items = relation_items(data_dir, ("relations/factual/*.json",), heldout_fraction=0.1, seed=0)
    items = relation_items_from_config(decoder.data_cfg)    # or: the split a trained run used
    rows = relations_by_layer(params, cfg, tokenizer, items, layers=(3, 6, 9), readers={9: reader})
    plot_by_layer(rows, "relations_by_layer.png")

Every item is one sample of a relation file: the relation's prompt template (sample i takes
template i mod n, as training reads it) filled with the subject, e.g. "The capital city of
Japan is", and its object ("Tokyo"). Subjects are split into train / held-out exactly as the
training pipeline splits them with data.relations_label="relation_subject" (the label
"relation:{name}/{subject}", split by lit_jax.data.pipeline.split_by_label), so a held-out
subject was never read in training. Methods, all scored on the held-out items:

- linear probe (Alain & Bengio 2016, "Understanding intermediate layers using linear classifier
  probes"): per relation, a multinomial logistic regression from the untrained model's residual
  stream after block L at the last subject token to the object, fitted on the train subjects.
  It can only predict objects seen among that relation's train objects: a held-out item whose
  object is not among them is counted wrong, and `coverage` says how many were predictable.
- Patchscope (Ghandeharioun et al. 2024, "Patchscopes: A Unifying Framework for Inspecting
  Hidden Representations of Language Models"): the same activation is written (replace mode)
  into the untrained model's residual stream after block L at the "?" of an identity prompt
  "cat -> cat; 1135 -> 1135; hello -> hello; ? ->", and the model continues greedily; the
  answer is the continuation up to the first ";" or newline. The identity prompt decodes what
  the activation *is* (the subject), so it names the object only where the subject's
  representation already resolves to it; optionally also the paper's attribute-extraction
  target prompt: the relation's zero-shot template with a placeholder subject ("The capital of
  x is the city of"), patched at "x" (patchscope prompt "relation").
- the trained decoder: `Reader.ask` on the whole text (the read training uses) with the
  training question ("Which city completes the text?"), scored with `object_correct`.
- majority: per relation, the most frequent train object (the floor a probe must beat).

Results are plain JSON-able dicts: {"correct": [bool], "n": int, "accuracy": float | None,
"per_relation": {relation: {"n", "accuracy", ...}}, ...}; accuracy is None when n = 0.
"""

from __future__ import annotations

import collections
import functools
import re
import time
import unicodedata
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lit_jax.data.config import default_data_config, resolve_data_dir
from lit_jax.data.errors import BadRecords, DataError
from lit_jax.data.pipeline import split_by_label
from lit_jax.data.readers import display_name, expand_sources, family, load_json, read_all_sources
from lit_jax.generate import SamplingConfig, end_token_ids, generate_tokens
from lit_jax.lit.residual_stream import ResidualWrite, layer_order, read_residual_stream, write_edit
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.padding import round_up

FACTUAL = ("relations/factual/*.json",)
DEFAULT_QUESTION = "Which {range} completes the text?"  # = default_data_config().relation_question
IDENTITY_PROMPT = "cat -> cat; 1135 -> 1135; hello -> hello; ? ->"
POSITIONS = ("subject", "last")


# ---------------------------------------------------------------------------------------- items


class RelationItem(NamedTuple):
    """One relation sample as the training pipeline reads it.

    text: template filled with the subject (what the target reads); subject_chars: the
    subject's [start, end) character span in text (its first occurrence, where the template's
    "{}" slot is); question: the training question for this relation; label: the split label
    ("relation:{name}/{subject}"); heldout: whether that label is held out of training;
    source / index: the file (relative to data_dir) and sample index, as in Record; template_zs: the
    relation's first zero-shot template (prompt_templates_zs[0], "" if none; the Patchscope
    relation prompt); range_name / domain_name: the relation's properties (what its question names).
    """

    relation: str
    subject: str
    object: str
    text: str
    template: str
    subject_chars: tuple[int, int]
    question: str
    range_name: str
    label: str
    heldout: bool
    source: str
    index: int
    template_zs: str = ""
    domain_name: str = "subject"

    @property
    def id(self) -> str:
        return f"{self.source}#{self.index}"


def relation_items(
    data_dir: str | None = None,
    files: Sequence[str] = FACTUAL,
    heldout_fraction: float = 0.1,
    seed: int = 0,
    *,
    split_files: Sequence[str] | None = None,
    question_template: str = DEFAULT_QUESTION,
    label_by: str = "relation_subject",
    max_records_per_source: int = 0,
) -> list[RelationItem]:
    """Every (relation, subject, object, text, template) sample of the relation files `files`, in
    file order, with whether its subject is held out of training.

    The held-out set is computed by the training pipeline's own functions (readers.read_all_sources,
    pipeline.split_by_label) over `split_files` (default: `files`) with the same heldout_fraction,
    seed (data.split_seed), label_by (data.relations_label) and max_records_per_source as the
    training data config. The split is per label family over *all* relation files a run trained
    on: pass that run's relation sources as `split_files` when evaluating a subset of them
    (a different file set gives a different split). Records dropped by max_records_per_source
    are not returned. data_dir: default the data config's default (../shared/data).

    Raises DataError (lit_jax.data) for a missing data dir, a glob matching nothing, or a file that
    is not a relation file; ValueError for a bad heldout_fraction or label_by.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction={heldout_fraction} must be in [0, 1)")
    if label_by not in ("relation", "relation_subject"):
        raise ValueError(f"label_by={label_by!r}; expected 'relation' or 'relation_subject'")
    c = default_data_config()
    if data_dir is not None:
        c.data_dir = data_dir
    c.sources = tuple(split_files or files)
    c.relations_label = label_by
    c.relation_question = question_template
    c.heldout_fraction = heldout_fraction
    c.split_seed = seed
    c.max_records_per_source = max_records_per_source
    root = resolve_data_dir(c)
    wanted = expand_sources(files, root)
    split_paths = expand_sources(c.sources, root)
    for path in wanted:
        if family(path) != "relations":
            raise DataError(f"{display_name(path, root)}: not a relation .json file")
    bad = BadRecords("error")
    families = read_all_sources(c, root, bad)
    split = split_by_label([f for f in families if f[0] == "relations"], heldout_fraction, seed)
    held = {(r.source, r.index) for r in split["heldout"]}
    by_file = dict(zip(split_paths, families))
    items = []
    for path in wanted:
        if path not in by_file:  # a file to evaluate that is not among split_files: never trained on
            raise ValueError(f"{display_name(path, root)} is not among split_files {tuple(c.sources)}")
        data = load_json(path)
        templates, props = data["prompt_templates"], data.get("properties") or {}
        zs = [t for t in data.get("prompt_templates_zs") or [] if isinstance(t, str) and "{}" in t]
        for r in by_file[path][1]:
            template = templates[r.index % len(templates)]
            subject = data["samples"][r.index]["subject"].strip()
            start = template.index("{}")
            if r.text != template.replace("{}", subject) or r.text[start: start + len(subject)] != subject:
                raise AssertionError(f"{r.source}#{r.index}: text {r.text!r} is not template {template!r} with "
                                     f"subject {subject!r}")  # readers.read_relation changed its rule
            items.append(RelationItem(
                relation=data["name"], subject=subject, object=r.answer, text=r.text, template=template,
                subject_chars=(start, start + len(subject)), question=r.question,
                range_name=props.get("range_name", "answer"), label=r.label, heldout=(r.source, r.index) in held,
                source=r.source, index=r.index, template_zs=zs[0] if zs else "",
                domain_name=props.get("domain_name", "subject")))
    return items


def relation_items_from_config(data_cfg: Any, files: Sequence[str] | None = None) -> list[RelationItem]:
    """relation_items with a training run's data config (data_dir, sources, heldout_fraction,
    split_seed, relations_label, relation_question, max_records_per_source), so the held-out
    subjects are the ones that run held out. files: which of its relation files to return
    (default: all of them). Raises ValueError when the config trains on no relation file, and as
    relation_items does."""
    root = resolve_data_dir(data_cfg)
    trained = [display_name(p, root) for p in expand_sources(data_cfg.sources, root) if family(p) == "relations"]
    if not trained:
        raise ValueError(f"data.sources {tuple(data_cfg.sources)} hold no relation file")
    return relation_items(data_cfg.data_dir, tuple(files or trained), data_cfg.heldout_fraction, data_cfg.split_seed,
                          split_files=tuple(trained), question_template=data_cfg.relation_question,
                          label_by=data_cfg.relations_label,
                          max_records_per_source=data_cfg.get("max_records_per_source", 0))


def heldout(items: Sequence[RelationItem]) -> list[RelationItem]:
    """The held-out items, in order."""
    return [it for it in items if it.heldout]


# ---------------------------------------------------------------------------------------- scoring

_ARTICLES = re.compile(r"^(?:(?:the|a|an)\s+)+")


def normalize(text: str) -> str:
    """Lowercase, accents removed (NFKD), punctuation -> space, leading articles "the/a/an"
    dropped, whitespace collapsed: "The Washington D.C.!" -> "washington d c"."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(ch for ch in text if not unicodedata.combining(ch)).lower()
    text = "".join(" " if unicodedata.category(ch).startswith(("P", "S")) else ch for ch in text)
    text = " ".join(text.split())
    return _ARTICLES.sub("", text).strip()


def object_correct(generated: str, obj: str) -> bool:
    """Whether a generated answer names the object: normalize(obj) occurs in normalize(generated)
    as a whole-word substring ("Tokyo." and "It is the city of Tokyo" are right for "Tokyo";
    "Tokyoites" is not).

    Decision: a *partial* multi-word object is not accepted ("Mexico" is wrong for "Mexico City",
    "Washington" for "Washington D.C."), since the leading word of a multi-word object is often
    another valid entity (the country Mexico). Raises ValueError for an object that normalizes to
    nothing (e.g. only punctuation).
    """
    target = normalize(obj)
    if not target:
        raise ValueError(f"object {obj!r} is empty after normalization")
    return f" {target} " in f" {normalize(generated)} "


def summarize(correct: Sequence[bool], items: Sequence[RelationItem], **per_item: Sequence[Any]) -> dict[str, Any]:
    """{"correct", "n", "accuracy", "ids", "per_relation": {rel: {"n", "accuracy"}}} plus any
    per-item lists given (answers, predictions, ...). accuracy is None when n = 0."""
    correct = [bool(c) for c in correct]
    out: dict[str, Any] = {"correct": correct, "n": len(correct), "accuracy": _mean(correct),
                           "ids": [it.id for it in items]}
    out.update({k: list(v) for k, v in per_item.items()})
    groups: dict[str, list[bool]] = collections.defaultdict(list)
    for c, it in zip(correct, items):
        groups[it.relation].append(c)
    out["per_relation"] = {r: {"n": len(cs), "accuracy": _mean(cs)} for r, cs in groups.items()}
    return out


def _mean(xs: Sequence[bool]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


# ---------------------------------------------------------------------------------------- activations


def token_positions(tokenizer: Any, items: Sequence[RelationItem]) -> tuple[list[np.ndarray], np.ndarray]:
    """([tokens int32 [R_i]], last subject token index int32 [N]) of each item's text, tokenized as
    training reads plain text (the tokenizer's own special tokens added; lit_jax.data.tokenize_read).

    The last subject token is the last token overlapping the subject's character span (a token
    running past the subject's end, e.g. a merged punctuation, still counts). Raises ValueError
    for an item whose subject span holds no token.
    """
    if not items:
        return [], np.zeros((0,), np.int32)
    enc = tokenizer([it.text for it in items], add_special_tokens=True, return_offsets_mapping=True)
    tokens, last = [], np.zeros(len(items), np.int32)
    for i, it in enumerate(items):
        off = np.asarray(enc["offset_mapping"][i]).reshape(-1, 2)
        start, end = it.subject_chars
        inside = np.flatnonzero((off[:, 0] < end) & (off[:, 1] > start) & (off[:, 1] > off[:, 0]))
        if inside.size == 0:
            raise ValueError(f"{it.id}: no token covers the subject {it.subject!r} in {it.text!r}")
        tokens.append(np.asarray(enc["input_ids"][i], np.int32))
        last[i] = inside[-1]
    return tokens, last


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def _stream_at(params, tokens, valid, at, *, cfg: ModelConfig, layers: tuple[int, ...]):
    """float32 [B, len(layers), D]: the residual stream after each of `layers` at index at[b] of row b."""
    h = read_residual_stream(params, tokens, cfg, layers, valid=valid)  # [n, B, T, D], layer_order
    picked = jnp.take_along_axis(h, at[None, :, None, None], axis=2)[:, :, 0]  # [n, B, D]
    order = layer_order(layers)
    picked = picked[jnp.asarray([order.index(x) for x in layers])]
    return jnp.swapaxes(picked, 0, 1).astype(jnp.float32)


def subject_activations(params: llama.Params, cfg: ModelConfig, tokenizer: Any, items: Sequence[RelationItem],
                        layers: Sequence[int], batch_size: int = 32, *, position: str = "subject",
                        length_multiple: int = 8) -> np.ndarray:
    """The untrained model's residual stream after each block in `layers` (0-based; HF
    hidden_states[L + 1]) at the last subject token of each item's text: float32 [N, len(layers), D],
    layers in the order given, rows in item order.

    position="last" takes the text's last token instead (where the model predicts the object).
    For "subject" only the tokens up to the last subject token are run (the model is causal).
    Texts are grouped by length rounded up to `length_multiple` (a length bucket); each bucket runs
    in batches of one shape [min(batch_size, N), bucket length] (right padding; a bucket's last
    batch padded with repeated rows) through one jitted forward (blocks 0..max(layers), no head),
    so a call compiles once per (cfg, layers, bucket) and a repeated call with the same shapes not
    at all. Raises ValueError for an unknown position, a layer outside the model, batch_size <= 0,
    or a subject spanning no token.
    """
    if position not in POSITIONS:
        raise ValueError(f"position={position!r}; expected one of {POSITIONS}")
    tokens, at = token_positions(tokenizer, items)
    if position == "last":
        at = np.asarray([len(t) - 1 for t in tokens], np.int32)
    else:  # the model is causal: the text after the subject cannot change its activations; not run
        tokens = [t[: a + 1] for t, a in zip(tokens, at)]
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    return activations_at(params, cfg, tokens, at, layers, pad, batch_size, length_multiple=length_multiple)


def activations_at(params: llama.Params, cfg: ModelConfig, tokens: Sequence[np.ndarray], at: np.ndarray,
                   layers: Sequence[int], pad_id: int, batch_size: int = 32, *, length_multiple: int = 8
                   ) -> np.ndarray:
    """The residual stream after each block in `layers` at token index at[i] of each token
    sequence tokens[i] (int32 [R_i]): float32 [N, len(layers), D], layers in the order given.
    Bucketed and batched as `subject_activations` describes (one compile per length bucket).
    ValueError for a layer outside the model or batch_size <= 0."""
    layers = tuple(int(x) for x in layers)
    if not layers or min(layers) < 0 or max(layers) >= cfg.num_layers:
        raise ValueError(f"layers {layers} must be non-empty and inside [0, {cfg.num_layers})")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    out = np.zeros((len(tokens), len(layers), cfg.hidden_size), np.float32)
    if not len(tokens):
        return out
    at, pad = np.asarray(at, np.int32), int(pad_id)
    rows = min(batch_size, len(tokens))
    buckets = np.asarray([round_up(len(t), length_multiple) for t in tokens])
    for length in sorted(set(buckets.tolist())):
        members = np.flatnonzero(buckets == length)
        for idx, n in _batches(len(members), rows):
            ids = members[idx]
            grid = np.full((rows, length), pad, np.int32)
            valid = np.zeros((rows, length), bool)
            for r, i in enumerate(ids):
                grid[r, : len(tokens[i])], valid[r, : len(tokens[i])] = tokens[i], True
            acts = _stream_at(params, jnp.asarray(grid), jnp.asarray(valid), jnp.asarray(at[ids]), cfg=cfg,
                              layers=layers)
            out[ids[:n]] = np.asarray(acts)[:n]
    return out


def _batches(n: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
    """[(indices into range(n), real rows)]: batches of exactly `batch_size` indices, the last one
    padded by repeating index 0 (so every batch has the same shape); the first `real rows` are real."""
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    out = []
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        out.append((np.concatenate([idx, np.zeros(batch_size - len(idx), int)]), len(idx)))
    return out


# ---------------------------------------------------------------------------------------- linear probe


def linear_probe(features: np.ndarray, items: Sequence[RelationItem], *, C: float = 1.0, max_iter: int = 2000,
                 standardize: bool = True, threads: int | None = 1) -> dict[str, Any]:
    """Per relation, a multinomial logistic regression (scikit-learn `LogisticRegression`, lbfgs, L2
    with inverse strength C, features standardized on the train items when `standardize`) from
    features float [N, D] (one row per item, e.g. subject_activations(...)[:, j]) to the object,
    fitted on that relation's train items and scored on its held-out items (Alain & Bengio 2016).

    Classes are the normalized train objects (`normalize`); a prediction is right when it equals
    the held-out item's normalized object. A held-out item whose object is not among its
    relation's train objects cannot be predicted and counts as wrong; `covered` marks the ones
    that can be, `coverage` = their share. A relation with one train class predicts it; one with
    no train items predicts nothing (wrong, uncovered). threads: BLAS/OpenMP threads for the fits
    (threadpoolctl; None: the libraries' default).

    Returns summarize(...) over the held-out items in item order, plus "predicted" [str | None],
    "covered" [bool], "coverage" (float | None), and per relation "coverage" and "classes".
    Raises ValueError when features and items differ in length.
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.asarray(features, np.float32)
    if features.ndim != 2 or len(features) != len(items):
        raise ValueError(f"features of shape {features.shape} for {len(items)} items: expected [N, D]")
    by_rel: dict[str, list[int]] = collections.defaultdict(list)
    for i, it in enumerate(items):
        by_rel[it.relation].append(i)
    predicted: dict[int, str | None] = {}
    classes_of: dict[str, int] = {}
    for rel, idx in by_rel.items():
        train = [i for i in idx if not items[i].heldout]
        test = [i for i in idx if items[i].heldout]
        y = [normalize(items[i].object) for i in train]
        classes = sorted(set(y))
        classes_of[rel] = len(classes)
        if not test:
            continue
        if not classes:
            predicted.update({i: None for i in test})
        elif len(classes) == 1:
            predicted.update({i: classes[0] for i in test})
        else:
            clf = LogisticRegression(C=C, max_iter=max_iter)
            model = make_pipeline(StandardScaler(), clf) if standardize else clf
            # One BLAS/OpenMP thread: these fits are small, and with threads on a busy machine (JAX, other
            # jobs) lbfgs measured 10-50x slower (e.g. 14.5 s vs 0.56 s for one 87-class fit).
            with warnings.catch_warnings(), threadpool_limits(threads):
                # one train item per class is expected here (e.g. capitals)
                warnings.filterwarnings("ignore", message="The number of unique classes is greater than 50%")
                model.fit(features[train], y)
                predicted.update(zip(test, (str(p) for p in model.predict(features[test]))))
    test_ids = [i for i, it in enumerate(items) if it.heldout]
    test_items = [items[i] for i in test_ids]
    train_classes = {rel: {normalize(items[i].object) for i in idx if not items[i].heldout}
                     for rel, idx in by_rel.items()}
    covered = [normalize(it.object) in train_classes[it.relation] for it in test_items]
    preds = [predicted[i] for i in test_ids]
    correct = [p is not None and p == normalize(it.object) for p, it in zip(preds, test_items)]
    out = summarize(correct, test_items, predicted=preds, covered=covered)
    out["coverage"] = _mean(covered)
    for rel, stats in out["per_relation"].items():
        stats["coverage"] = _mean([c for c, it in zip(covered, test_items) if it.relation == rel])
        stats["classes"] = classes_of[rel]
    return out


def majority_baseline(items: Sequence[RelationItem]) -> dict[str, Any]:
    """Per relation, the most frequent normalized train object (ties: alphabetically first) as the
    answer for every held-out item: the floor a probe has to beat. summarize(...) over the held-out
    items, plus "predicted"."""
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for it in items:
        if not it.heldout:
            counts[it.relation][normalize(it.object)] += 1
    top = {r: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for r, c in counts.items()}
    test = heldout(items)
    preds = [top.get(it.relation) for it in test]
    return summarize([p == normalize(it.object) for p, it in zip(preds, test)], test, predicted=preds)


# ---------------------------------------------------------------------------------------- Patchscope


class PatchPrompt(NamedTuple):
    """tokens int32 [T] of a Patchscope target prompt; position: index of the token holding its placeholder."""

    tokens: np.ndarray
    position: int


def patch_prompt(tokenizer: Any, prompt: str = IDENTITY_PROMPT, placeholder: str = "?", at: int | None = None
                 ) -> PatchPrompt:
    """A Patchscope target prompt tokenized as plain text (the tokenizer's special tokens added), and
    the index of the token holding the placeholder: the character at `at`, default the last
    occurrence of `placeholder`. Raises ValueError when the prompt has no placeholder or no single
    token holds that character."""
    at = prompt.rfind(placeholder) if at is None else at
    if not 0 <= at < len(prompt):
        raise ValueError(f"patchscope prompt {prompt!r} has no placeholder {placeholder!r}")
    enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
    off = np.asarray(enc["offset_mapping"]).reshape(-1, 2)
    hit = np.flatnonzero((off[:, 0] <= at) & (off[:, 1] > at))
    if hit.size != 1:
        raise ValueError(f"no single token holds the placeholder at character {at} of {prompt!r}")
    return PatchPrompt(np.asarray(enc["input_ids"], np.int32), int(hit[0]))


def relation_prompt(tokenizer: Any, item: RelationItem, placeholder: str = "x") -> PatchPrompt:
    """The Patchscopes paper's attribute-extraction target prompt: the relation's zero-shot template
    with a placeholder subject ("The capital of x is the city of"), patched at the placeholder.
    Raises ValueError for an item without a zero-shot template."""
    if "{}" not in item.template_zs:
        raise ValueError(f"{item.id}: relation {item.relation!r} has no zero-shot template (prompt_templates_zs)")
    at = item.template_zs.index("{}")
    return patch_prompt(tokenizer, item.template_zs.replace("{}", placeholder), placeholder, at=at)


def patch_edit(vectors: jax.Array, positions: int | jax.Array, layer: int) -> llama.BlockEdit:
    """The Patchscope write: after block `layer`, the residual stream of row b at positions[b] (or at
    one position for all rows) is replaced by vectors[b] (vectors [B, D]); a `llama.BlockEdit` for
    forward / generation."""
    b = vectors.shape[0]
    positions = jnp.broadcast_to(jnp.asarray(positions, jnp.int32), (b,))
    write = ResidualWrite(vectors[:, None, :], positions[:, None], jnp.ones((b, 1), bool))
    return write_edit(write, layer, "replace")


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "sampling", "eos_ids", "pad_id"))
def _patched_generate(params, tokens, valid, vectors, positions, *, cfg: ModelConfig, layer: int,
                      sampling: SamplingConfig, eos_ids: tuple[int, ...], pad_id: int):
    return generate_tokens(params, tokens, valid, jax.random.key(0), cfg=cfg, sampling=sampling, eos_ids=eos_ids,
                           pad_id=pad_id, prefill_edit=patch_edit(vectors, positions, layer))


def stop_ids(cfg: ModelConfig, tokenizer: Any) -> tuple[int, ...]:
    """Where a Patchscope continuation may stop: every end token, and the single tokens ";" and "\n"."""
    extra = [ids[0] for ids in (tokenizer.encode(s, add_special_tokens=False) for s in (";", "\n")) if len(ids) == 1]
    return tuple(sorted(set(end_token_ids(cfg, tokenizer)) | set(extra)))


def patchscope_answer(text: str) -> str:
    """The continuation up to the first ";" or newline, stripped."""
    return re.split(r"[;\n]", text, maxsplit=1)[0].strip()


def patchscope(params: llama.Params, cfg: ModelConfig, tokenizer: Any, vectors: np.ndarray, layer: int, *,
               prompt: str | PatchPrompt | Sequence[PatchPrompt] = IDENTITY_PROMPT, max_new_tokens: int = 8,
               batch_size: int = 32, length_multiple: int = 8) -> list[str]:
    """Patchscope answers (Ghandeharioun et al. 2024) for vectors float [N, D], each taken from block
    `layer`'s output: the vector replaces the residual stream after block `layer` (same layer) at
    the placeholder token of the target prompt during prefill; greedy generation of at most
    max_new_tokens; answer = the decoded continuation up to the first ";" or newline
    (`patchscope_answer`).

    prompt: one target prompt for every vector (a string: its last "?" is the placeholder; or a
    PatchPrompt), or one PatchPrompt per vector (e.g. `relation_prompt` per item). Prompts are left
    padded to one length (round_up(longest, length_multiple)) and run in batches of
    min(batch_size, N) rows, the last padded: one compilation per (layer, shape). Raises ValueError
    for a layer outside the model, vectors not [N, hidden], or a prompt count != N.
    """
    vectors = np.asarray(vectors, np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != cfg.hidden_size:
        raise ValueError(f"vectors of shape {vectors.shape}: expected [N, {cfg.hidden_size}]")
    if not 0 <= int(layer) < cfg.num_layers:
        raise ValueError(f"layer {layer} outside [0, {cfg.num_layers})")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if isinstance(prompt, str):
        prompt = patch_prompt(tokenizer, prompt)
    prompts = [prompt] * len(vectors) if isinstance(prompt, PatchPrompt) else list(prompt)
    if len(prompts) != len(vectors):
        raise ValueError(f"{len(prompts)} prompts for {len(vectors)} vectors")
    if not len(vectors):
        return []
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    length = round_up(max(len(p.tokens) for p in prompts), length_multiple)
    grid = np.full((len(prompts), length), pad, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    positions = np.zeros(len(prompts), np.int32)
    for i, p in enumerate(prompts):  # left padding: every prompt ends where generation starts
        grid[i, length - len(p.tokens):], valid[i, length - len(p.tokens):] = p.tokens, True
        positions[i] = length - len(p.tokens) + p.position
    sampling, eos = SamplingConfig(max_new_tokens=max_new_tokens), stop_ids(cfg, tokenizer)
    answers: list[str] = [""] * len(vectors)
    for idx, n in _batches(len(vectors), min(batch_size, len(vectors))):
        out, lengths = _patched_generate(params, jnp.asarray(grid[idx]), jnp.asarray(valid[idx]),
                                         jnp.asarray(vectors[idx]), jnp.asarray(positions[idx]), cfg=cfg,
                                         layer=int(layer), sampling=sampling, eos_ids=eos, pad_id=pad)
        out, lengths = np.asarray(out), np.asarray(lengths)
        for row in range(n):
            answers[idx[row]] = patchscope_answer(tokenizer.decode(out[row, : lengths[row]].tolist(),
                                                                   skip_special_tokens=True))
    return answers


PATCHSCOPE_PROMPTS = ("identity", "relation")


def patchscope_relations(params, cfg: ModelConfig, tokenizer: Any, items: Sequence[RelationItem],
                         features: np.ndarray, layer: int, *, prompt: str = "identity", **kwargs: Any
                         ) -> dict[str, Any]:
    """Patchscope scored with `object_correct` on `items` (all of them; pass held-out ones) with
    features [N, D] from block `layer` (e.g. subject_activations(..., [layer])[:, 0]).

    prompt: "identity" (IDENTITY_PROMPT, patched at "?"), "relation" (each item's `relation_prompt`:
    its relation's zero-shot template with subject "x", patched at "x": the Patchscopes paper's
    attribute extraction), or any other string (a target prompt whose last "?" is patched).
    Returns summarize(...) plus "answers" and "prompt". kwargs go to `patchscope`.
    """
    if prompt == "identity":
        target: Any = IDENTITY_PROMPT
    elif prompt == "relation":
        target = [relation_prompt(tokenizer, it) for it in items]
    else:
        target = prompt
    answers = patchscope(params, cfg, tokenizer, features, layer, prompt=target, **kwargs)
    out = summarize([object_correct(a, it.object) for a, it in zip(answers, items)], items, answers=answers)
    out["prompt"] = prompt
    return out


# ---------------------------------------------------------------------------------------- trained decoder


def decoder_relations(reader: Any, items: Sequence[RelationItem], layer: int | None, question: str | None = None, *,
                      heldout_only: bool = True, batch_size: int = 16, read_order: Sequence[int] | None = None,
                      text_only: bool = False) -> dict[str, Any]:
    """The trained decoder's answers (Reader.ask, lit_jax.lit.read) for items, read as training reads
    them: the whole text (lit_jax.data.tokenize_read(tokenizer, text): all text tokens are read
    positions) at target layer `layer`, asked `question` filled as training fills it ({range},
    {domain}, {relation}; default: the reader's data config's relation_question, else "Which {range} completes the
    text?"), scored with `object_correct`.

    heldout_only: evaluate only held-out items (train subjects were seen in training). Batches of
    `batch_size` (the last padded by repeating a read, so batches share shapes). The controls
    (lit_jax.eval.controls): read_order[i] = whose read item i's question is asked about (shuffled),
    text_only = the text instead of its activations. Returns summarize(...) plus "answers" and
    "questions". Raises ValueError as Reader.ask does (e.g. an untrained layer).
    """
    from lit_jax.data.chat import tokenize_read

    items = heldout(items) if heldout_only else list(items)
    if question is None:
        question = reader.data_cfg.get("relation_question", DEFAULT_QUESTION) if reader.data_cfg else DEFAULT_QUESTION
    reads = [tokenize_read(reader.tokenizer, it.text) for it in items]
    if read_order is not None:
        reads = [reads[j] for j in read_order]
    questions = [question.format(range=it.range_name, domain=it.domain_name, relation=it.relation) for it in items]
    answers: list[str] = []
    for lo in range(0, len(items), batch_size):
        r, q = reads[lo: lo + batch_size], questions[lo: lo + batch_size]
        n = len(r)
        if n < batch_size and len(items) > batch_size:
            r, q = r + [r[-1]] * (batch_size - n), q + [q[-1]] * (batch_size - n)
        answers += reader.ask(r, q, layer=layer, text_only=text_only)[:n]
    return summarize([object_correct(a, it.object) for a, it in zip(answers, items)], items, answers=answers,
                     questions=questions)


# ---------------------------------------------------------------------------------------- by layer


def relations_by_layer(params: llama.Params, cfg: ModelConfig, tokenizer: Any, items: Sequence[RelationItem],
                       layers: Sequence[int], *, readers: Mapping[int, Any] | None = None, batch_size: int = 32,
                       patchscope_items: int | None = None, seed: int = 0, probe_C: float = 1.0,
                       max_new_tokens: int = 8, patchscope_prompts: Sequence[str] = ("identity",),
                       position: str = "subject", decoder_question: str | None = None) -> list[dict[str, Any]]:
    """Accuracy vs read layer: one row per layer, {"layer", "probe", "majority", "patchscope" (the
    identity prompt), "patchscope_relation" (when "relation" is in patchscope_prompts), "seconds"}
    and "decoder" where `readers` has a reader trained on that layer; each method's result as in
    its function (linear_probe, majority_baseline, patchscope_relations, decoder_relations), all on
    the held-out items.

    The activations (position "subject": last subject token; "last": last text token) come from one
    pass over all items for all layers. patchscope_items: evaluate Patchscope on a seeded random
    subset of that many held-out items (None: all), for speed; its result says how many ("n").
    Each row's "seconds": wall time per method at that layer (compiles included).
    Raises ValueError as the functions it calls do, and for an unknown Patchscope prompt kind.
    """
    layers = tuple(int(x) for x in layers)
    unknown = [p for p in patchscope_prompts if p not in PATCHSCOPE_PROMPTS]
    if unknown:
        raise ValueError(f"patchscope_prompts {unknown}: expected some of {PATCHSCOPE_PROMPTS}")
    acts = subject_activations(params, cfg, tokenizer, items, layers, batch_size, position=position)
    test_ids = [i for i, it in enumerate(items) if it.heldout]
    ps_ids = test_ids
    if patchscope_items is not None and patchscope_items < len(test_ids):
        rng = np.random.default_rng(seed)
        ps_ids = sorted(rng.choice(test_ids, size=patchscope_items, replace=False).tolist())
    majority = majority_baseline(items)
    rows = []
    for j, layer in enumerate(layers):
        row: dict[str, Any] = {"layer": layer, "position": position, "majority": majority, "seconds": {}}
        clock = time.perf_counter()
        row["probe"] = linear_probe(acts[:, j], items, C=probe_C)
        row["seconds"]["probe"] = time.perf_counter() - clock
        for kind in patchscope_prompts:
            key, clock = "patchscope" if kind == "identity" else f"patchscope_{kind}", time.perf_counter()
            row[key] = patchscope_relations(params, cfg, tokenizer, [items[i] for i in ps_ids], acts[ps_ids, j], layer,
                                            prompt=kind, max_new_tokens=max_new_tokens, batch_size=batch_size)
            row["seconds"][key] = time.perf_counter() - clock
        if readers and layer in readers:
            clock = time.perf_counter()
            row["decoder"] = decoder_relations(readers[layer], items, layer, decoder_question)
            row["seconds"]["decoder"] = time.perf_counter() - clock
        rows.append(row)
    return rows


METHOD_STYLE = {"probe": ("linear probe", "o-"), "patchscope": ("Patchscope (identity prompt)", "s-"),
                "patchscope_relation": ("Patchscope (relation prompt)", "d-"), "decoder": ("LIT decoder", "^-")}


def plot_by_layer(rows: Sequence[Mapping[str, Any]], path: str, title: str = "Relational knowledge by read layer"
                  ) -> str:
    """A PNG at `path`: x = read layer, y = held-out accuracy, one line per method present in the rows
    (probe, Patchscope with either prompt, decoder), the majority baseline as a dashed line. Uses matplotlib's Agg
    canvas directly (no global backend change). Returns path. Raises ValueError for no rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not rows:
        raise ValueError("no rows to plot")
    fig = Figure(figsize=(6.4, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method, (label, style) in METHOD_STYLE.items():
        pts = [(r["layer"], r[method]["accuracy"]) for r in rows
               if method in r and r[method].get("accuracy") is not None]
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, style, label=label)
    ax.set_xticks(sorted({int(r["layer"]) for r in rows}))
    majority = [r["majority"]["accuracy"] for r in rows if r.get("majority", {}).get("accuracy") is not None]
    if majority:
        ax.axhline(float(np.mean(majority)), color="gray", linestyle="--", label="majority (per relation)")
    ax.set_xlabel("read layer (residual stream after block L)")
    ax.set_ylabel("held-out accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
