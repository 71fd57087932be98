"""Control: steer the target with `jax.grad` through a frozen LIT decoder.

A control is a set of desired (question, answer) pairs about the target ("What persona
will the assistant adopt?" -> "Someone obsessed with the Golden Gate Bridge."). The
decoder's cross-entropy of those answers, reading the target's residual stream at the
read layer over a set of prompts, is differentiable in the target's activations, so the
target can be changed until the decoder "sees" the desired answers:

- method "vectors" (activation steering): vectors [n_layers_steered, D] added to the
  residual stream after chosen blocks (every position: prompt and generated tokens). The
  blocks must come before the read layer. Each vector is kept in an L2 ball of radius
  `max_norm` x the typical residual norm at its layer (projected after every step) so the
  target stays fluent; optimised in units of that typical norm (`vector_lr` moves a vector
  by about that fraction of it per step).
- method "lora" (the LatentQA paper's control): adapters on the target's blocks 0..read layer.
- per_layer=True: the decoder reads the output of *every* block 0..read layer (one scan,
  models/steering.py `steered_stream(collect=True)`), each with its own loss, summed.

Penalty (`vector_penalty` / `lora_penalty`): weight of the mean squared change of the
read-layer residual stream (relative to its typical squared norm) at the read positions.
Measured on the SmolLM2-135M demo decoder (golden_gate, 30 steps): a target LoRA without
it drove the decoder loss lowest (2.79 -> 1.34 held out) but broke the target's text; with
5.0 (2.79 -> 1.92) the target answered fluently and about the Golden Gate.

    decoder = load_decoder(workdir)
    qa = read_control_file("../shared/data/latentqa/controls/golden_gate.json")
    train, heldout = split_prompts(read_prompts("configs/control_prompts.jsonl"), 40, 20, seed=0)
    result = optimize_control(decoder, qa, train, heldout, ControlConfig(method="vectors"))
    save_steering(out_dir, result)                     # steering.safetensors + steering.json, atomically
    chat(decoder.base, decoder.cfg, decoder.tokenizer, ["Hi!"], steering=load_steering(out_dir).steering)

Command line: `python -m lit_jax.main --config=configs/control.py --config.decoder=WORKDIR
--config.control.file=... --config.control.method=vectors|lora` (`run_control`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lit_jax.atomic_dir import write_directory
from lit_jax.data import DecoderFormat, plain_batch, tokenize_read
from lit_jax.data.batch import LitBatch
from lit_jax.data.batching import fit_bucket, fixed_rows
from lit_jax.data.errors import DataError
from lit_jax.lit.config import LitConfig
from lit_jax.lit.cross_entropy import token_nll
from lit_jax.lit.loss import decoder_weights
from lit_jax.lit.projection import project
from lit_jax.lit.residual_stream import ResidualWrite, l2_norm, read_residual_stream, write_edit
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LoraConfig, LoraWeights, init_lora, projection_dims
from lit_jax.models.steering import Steering, dense_vectors, steered_stream
from lit_jax.padding import round_up

METHODS = ("vectors", "lora")
STEERING_FILE = "steering.safetensors"
SETTINGS_FILE = "steering.json"
SETTINGS_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    """How to steer (the `control` section of configs/control.py; these defaults are the only definition).

    file: control JSON {control prompt: [[question, answer], ...]}. method: "vectors" | "lora".
    layers: vectors: the blocks after which a vector is added, each in [0, read layer);
        () = (read layer // 2,). Unused by "lora" (it adapts blocks 0..read layer).
    read_layer: the target layer the decoder reads (-1: its first trained read layer).
    per_layer: every block 0..read layer read, one loss each, summed.
    prompts: JSONL of prompts ({"prompt"} or dolly/alpaca {"instruction", "input"/"context"}) or a
        JSON list of strings; split (seeded) into num_train + num_heldout.
    max_prompt_tokens: longer prompts are skipped. steps, batch_size: optimisation.
    vector_lr: Adam step for vectors, in units of the typical residual norm (a vector moves by
        about vector_lr x that norm per step). lora_lr: Adam learning rate of the target adapters.
    max_norm: vectors' L2 norm <= max_norm x the typical residual norm at their layer (0: no limit).
        On SmolLM2-135M (demo decoder, block 7, read layer 15) 0.3 kept generations fluent but
        changed; 0.8 lowered the decoder loss further and broke the target's text.
    vector_penalty, lora_penalty: weight of the read-layer residual change (relative, squared)
        added to the loss, per method (0: none; the vectors' budget already bounds them).
    lora_rank, lora_alpha, lora_targets: the target adapters.
    eval_examples: (prompt, QA) examples evaluated per split before/after (evenly spread; 0: all).
    num_generations, max_new_tokens: generations shown before/after (held-out prompts).
    out: result directory ("" = <workdir>/<control file stem>_<method>[_per_layer]).
    """

    file: str = "../shared/data/latentqa/controls/golden_gate.json"
    method: str = "vectors"
    layers: tuple[int, ...] = ()
    read_layer: int = -1
    per_layer: bool = False
    prompts: str = "configs/control_prompts.jsonl"
    num_train: int = 40
    num_heldout: int = 20
    max_prompt_tokens: int = 256
    steps: int = 60
    batch_size: int = 8
    vector_lr: float = 0.05
    lora_lr: float = 1e-3
    max_norm: float = 0.3
    vector_penalty: float = 0.0
    lora_penalty: float = 5.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    eval_examples: int = 60
    num_generations: int = 3
    max_new_tokens: int = 48
    out: str = ""

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"control.method={self.method!r}; expected one of {METHODS}")
        for name in ("steps", "batch_size", "max_prompt_tokens", "lora_rank", "max_new_tokens"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"control.{name}={getattr(self, name)!r}: must be at least 1")
        for name in ("max_norm", "vector_penalty", "lora_penalty", "eval_examples", "num_generations"):
            if getattr(self, name) < 0:
                raise ValueError(f"control.{name}={getattr(self, name)!r}: must be >= 0")


# ----------------------------------------------------------------------------- inputs


def read_control_file(path: str) -> list[tuple[str, str]]:
    """The desired (question, answer) pairs of a control file {control prompt: [[question, answer], ...]}
    (every key's pairs, in order). Raises DataError naming the file (and key / pair) for a missing
    file, invalid JSON, another layout, a malformed pair, or no pairs at all."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: control file not found")
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object {{control prompt: [[question, answer], ...]}}, "
                        f"got a {type(data).__name__}")
    pairs = []
    for key, items in data.items():
        if not isinstance(items, list):
            raise DataError(f"{path}: key {key[:60]!r}: expected a list of [question, answer] pairs")
        for i, pair in enumerate(items):
            ok = (isinstance(pair, (list, tuple)) and len(pair) == 2
                  and all(isinstance(s, str) and s.strip() for s in pair))
            if not ok:
                raise DataError(f"{path}: key {key[:60]!r}, pair {i}: expected [question, answer] (two non-empty "
                                f"strings), got {json.dumps(pair)[:120]}")
            pairs.append((pair[0].strip(), pair[1].strip()))
    if not pairs:
        raise DataError(f"{path}: no (question, answer) pairs: a control needs at least one desired answer")
    return pairs


def _prompt_of(record: Any) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    head = record.get("prompt", record.get("instruction"))
    if not isinstance(head, str):
        return None
    extra = record.get("input", record.get("context", ""))
    return head.strip() + ("\n\n" + extra.strip() if isinstance(extra, str) and extra.strip() else "")


def read_prompts(path: str) -> list[str]:
    """User prompts from a JSONL file (one {"prompt": ...} or dolly/alpaca {"instruction": ...,
    "input"/"context": ...} per line; blank lines skipped) or a JSON list (of strings or such
    objects). Raises DataError naming the file (and line) for a missing file, a malformed line,
    a record without a prompt, or no prompts at all."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: prompts file not found")
    with open(path, encoding="utf-8-sig") as f:
        text = f.read()
    records: list[tuple[str, Any]] = []
    if path.endswith(".json"):
        try:
            data = json.loads(text) if text.strip() else []
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of prompts")
        records = [(f"item {i}", r) for i, r in enumerate(data)]
    else:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {n}: not valid JSON ({e})") from None
    prompts = []
    for where, record in records:
        p = _prompt_of(record)
        if p is None or not p.strip():
            raise DataError(f"{path}: {where}: no prompt (expected a string, or an object with a non-empty "
                            f"\"prompt\" or \"instruction\" field)")
        prompts.append(p.strip())
    if not prompts:
        raise DataError(f"{path}: no prompts: the file is empty")
    return prompts


def split_prompts(prompts: Sequence[str], num_train: int, num_heldout: int, seed: int = 0
                  ) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a seeded shuffle, then the first num_train and the next num_heldout.
    With fewer prompts, both shrink in proportion (each keeps at least one). Raises ValueError
    for fewer than 2 prompts or a non-positive count."""
    if num_train < 1 or num_heldout < 1:
        raise ValueError(f"control.num_train={num_train}, control.num_heldout={num_heldout}: both must be >= 1")
    if len(prompts) < 2:
        raise ValueError(f"{len(prompts)} prompt(s): need at least 2 (one to train on, one held out)")
    order = np.random.default_rng(seed).permutation(len(prompts))
    shuffled = [prompts[i] for i in order]
    if len(prompts) < num_train + num_heldout:
        num_heldout = min(len(prompts) - 1, max(1, round(len(prompts) * num_heldout / (num_train + num_heldout))))
        num_train = len(prompts) - num_heldout
    return shuffled[:num_train], shuffled[num_train: num_train + num_heldout]


def check_layers(method: str, layers: Sequence[int], read_layer: int, num_layers: int) -> tuple[int, ...]:
    """The blocks a control changes: vectors: `layers` (default (read_layer // 2,)), each in
    [0, read_layer); lora: 0..read_layer (`layers` must be empty). Raises ValueError naming
    control.layers and the allowed range for a layer out of range or repeated, layers given
    for lora, and a read layer outside the model."""
    if not 0 <= read_layer < num_layers:
        raise ValueError(f"read layer {read_layer} (control.read_layer) outside the model's blocks [0, {num_layers})")
    if method == "lora":
        if tuple(layers):
            raise ValueError(f"control.layers={tuple(layers)} is for method=vectors; method=lora adapts "
                             f"0..{read_layer} (the blocks up to the read layer): leave control.layers empty")
        return tuple(range(read_layer + 1))
    if method != "vectors":
        raise ValueError(f"control.method={method!r}; expected one of {METHODS}")
    if read_layer == 0:
        raise ValueError("the decoder reads layer 0: no block comes before it to steer with vectors "
                         "(control.layers must be < the read layer); use control.method=lora")
    layers = tuple(int(x) for x in layers) or (read_layer // 2,)
    bad = [x for x in layers if not 0 <= x < read_layer]
    if bad:
        raise ValueError(f"control.layers={layers}: steering layer(s) {bad} out of range; allowed: 0..{read_layer - 1} "
                         f"(before the read layer {read_layer}: a vector added at or after it cannot change "
                         "what the decoder reads)")
    if len(set(layers)) != len(layers):
        raise ValueError(f"control.layers={layers} repeats a layer")
    return tuple(sorted(layers))


# ----------------------------------------------------------------------------- examples and batches


def prompt_read(tokenizer: Any, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """(read_tokens, read_positions) of a one-user-turn dialog read from turn 0 (with the
    generation prompt: the tokens a chat generation starts from)."""
    return tokenize_read(tokenizer, [{"role": "user", "content": prompt}], read_from_turn=0)


def control_examples(tokenizer: Any, fmt: DecoderFormat, prompts: Sequence[str], qa: Sequence[tuple[str, str]],
                     layer: int, max_prompt_tokens: int) -> tuple[list[dict], int]:
    """(examples, skipped prompts): one example per (prompt, QA pair), the dict `collate` takes
    (read_tokens, read_positions, decoder_tokens, write_positions, loss_mask, read_layer).
    Prompts longer than max_prompt_tokens are skipped. Raises ValueError when a QA pair cannot
    be built into a decoder example (naming it) or when every prompt is skipped."""
    reads, skipped = [], 0
    for p in prompts:
        r = prompt_read(tokenizer, p)
        if len(r[0]) > max_prompt_tokens:
            skipped += 1
            continue
        reads.append(r)
    if not reads:
        raise ValueError(f"all {len(prompts)} prompts are longer than control.max_prompt_tokens={max_prompt_tokens}")
    items = [(len(pos), q, a, layer) for _, pos in reads for q, a in qa]
    built = fmt.examples(items)
    out = []
    for k, ex in enumerate(built):
        if isinstance(ex, str):
            q, a = qa[k % len(qa)]
            raise ValueError(f"control pair ({q!r}, {a!r}): {ex}")
        tokens, positions = reads[k // len(qa)]
        dec, write, loss = ex
        out.append({"read_tokens": tokens, "read_positions": positions, "decoder_tokens": dec,
                    "write_positions": write, "loss_mask": loss, "read_layer": layer})
    return out, skipped


class Bucket(NamedTuple):
    """One fixed batch shape for every control batch (no recompiles): read length R, slots S,
    decoder length T, targets P, rows B."""

    read: int
    slots: int
    decoder: int
    targets: int
    rows: int


def bucket_for(examples: Sequence[dict], rows: int) -> Bucket:
    """The smallest Bucket (lengths rounded up to 16 / 8) that holds every example."""
    return Bucket(*fit_bucket(examples), rows)


def make_batch(examples: Sequence[dict], bucket: Bucket, pad_id: int, layer: int) -> LitBatch:
    """A plain LitBatch of `bucket`'s shape (missing rows: dummy rows without targets).
    Raises ValueError for more examples than rows or one that does not fit."""
    return plain_batch(fixed_rows(examples, bucket.rows, bucket[:4], pad_id, layer))


# ----------------------------------------------------------------------------- the loss


@dataclasses.dataclass(frozen=True)
class ControlSpec:
    """What is optimised (hashable: a static argument of the jitted step).

    layers: vectors: the steered blocks (order of the rows of theta["vectors"]); lora: 0..read_layer.
    max_norm: vectors' radius in units of the typical norm (0: none). lora_scale: alpha / rank.
    """

    method: str
    layers: tuple[int, ...]
    read_layer: int
    per_layer: bool = False
    penalty: float = 0.0
    max_norm: float = 0.3
    lora: LoraConfig | None = None

    @property
    def read_layers(self) -> tuple[int, ...]:
        """The layers the decoder reads: every block 0..read_layer (per_layer), else the read layer."""
        return tuple(range(self.read_layer + 1)) if self.per_layer else (self.read_layer,)


def init_theta(key: jax.Array, spec: ControlSpec, cfg: ModelConfig) -> dict:
    """The optimised parameters at the start (the target unchanged): {"vectors": zeros float32
    [len(layers), D]} (units of the typical residual norm), or {"lora": adapters of blocks
    0..read_layer, A [read_layer + 1, r, in], B = 0}."""
    if spec.method == "vectors":
        return {"vectors": jnp.zeros((len(spec.layers), cfg.hidden_size), jnp.float32)}
    full = init_lora(key, cfg, spec.lora)
    return {"lora": jax.tree.map(lambda a: a[: spec.read_layer + 1], full)}


def steering_of(theta: dict, scales: jax.Array, spec: ControlSpec, cfg: ModelConfig) -> Steering:
    """The target's Steering for parameters `theta` (differentiable). scales float32 [len(layers)]:
    the typical residual norm at each steered layer (vectors = theta["vectors"] * scales)."""
    if spec.method == "vectors":
        return Steering(vectors=dense_vectors(spec.layers, theta["vectors"] * scales[:, None], cfg.num_layers))
    pad = cfg.num_layers - (spec.read_layer + 1)
    params = jax.tree.map(lambda a: jnp.pad(a, ((0, pad),) + ((0, 0),) * (a.ndim - 1)), theta["lora"])
    return Steering(lora=LoraWeights(params, spec.lora.scale))


def decoder_nll(trainable: dict, base: llama.Params, acts: jax.Array, batch: LitBatch, cfg: ModelConfig,
                lcfg: LitConfig) -> tuple[jax.Array, jax.Array]:
    """(nll, hit) float32 [n, B, P] of the batch's answer tokens, the decoder reading acts [n, B, S, D]
    (n sets of activations for the same rows, decoded as one batch of n x B rows). The decoder
    is frozen; differentiable in acts."""
    n, b = acts.shape[:2]
    vectors = project(trainable["proj"], acts.reshape(n * b, *acts.shape[2:]), lcfg)
    tile = lambda a: None if a is None else jnp.tile(a, (n,) + (1,) * (a.ndim - 1))  # noqa: E731
    dec, slots, targets = (jax.tree.map(tile, t) for t in (batch.decoder, batch.slots, batch.targets))
    params, lora = decoder_weights(trainable, base, cfg, lcfg)
    write = ResidualWrite(vectors, slots.write_positions, slots.mask)
    out = llama.forward(params, dec.tokens, cfg, valid=dec.valid, positions=dec.depth, subtree_end=dec.subtree_end,
                        lora=lora, edit=write_edit(write, lcfg.write_layer, lcfg.write_mode),
                        logits_at=targets.logit_positions)
    nll, hit = token_nll(out.logits, targets.tokens)
    return nll.reshape(n, b, -1), hit.reshape(n, b, -1)


class ControlSums(NamedTuple):
    """Sums over a batch (exact means over several batches): nll / hits [n] per read layer
    (spec.read_layers), count: answer tokens, shift: summed relative squared change of the
    read-layer residual at the read positions, positions: read positions."""

    nll: jax.Array
    hits: jax.Array
    count: jax.Array
    shift: jax.Array
    positions: jax.Array


def control_sums(theta: dict, trainable: dict, base: llama.Params, batch: LitBatch, scales: jax.Array,
                 read_scale: jax.Array, *, spec: ControlSpec, cfg: ModelConfig, lcfg: LitConfig) -> ControlSums:
    """The decoder's answer cross-entropy sums on `batch` with the target steered by `theta`.

    The steered target runs blocks 0..read_layer in one scan (collecting every block's output
    when per_layer); read_scale: the typical residual norm at the read layer (scalar float32),
    for the shift (computed only when spec.penalty > 0; else 0).
    """
    steering = steering_of(theta, scales, spec, cfg)
    read = batch.read
    stop = spec.read_layer + 1
    hs = steered_stream(base, read.tokens, cfg, steering, stop, valid=read.valid, positions=read.depth,
                        subtree_end=read.subtree_end, collect=spec.per_layer)
    hs = hs if spec.per_layer else hs[None]  # [n, B, R, D]
    rows = jnp.arange(hs.shape[1])[:, None]
    acts = hs[:, rows, batch.slots.read_positions]  # [n, B, S, D]
    nll, hit = decoder_nll(trainable, base, acts, batch, cfg, lcfg)
    w = batch.targets.mask.astype(jnp.float32)
    slot_w = batch.slots.mask.astype(jnp.float32)
    shift = jnp.zeros((), jnp.float32)
    if spec.penalty > 0:
        plain = jax.lax.stop_gradient(read_residual_stream(
            base, read.tokens, cfg, (spec.read_layer,), valid=read.valid, positions=read.depth,
            subtree_end=read.subtree_end)[0][rows, batch.slots.read_positions])
        change = l2_norm(acts[-1].astype(jnp.float32) - plain.astype(jnp.float32))[..., 0] / read_scale
        shift = jnp.sum(jnp.square(change) * slot_w)
    return ControlSums(jnp.sum(nll * w, axis=(1, 2)), jnp.sum(hit * w, axis=(1, 2)), jnp.sum(w), shift,
                       jnp.sum(slot_w))


def control_loss(theta: dict, trainable: dict, base: llama.Params, batch: LitBatch, scales: jax.Array,
                 read_scale: jax.Array, *, spec: ControlSpec, cfg: ModelConfig, lcfg: LitConfig
                 ) -> tuple[jax.Array, ControlSums]:
    """(loss, sums): the decoder's mean answer cross-entropy on the batch (summed over the read
    layers when per_layer) plus penalty x the mean relative squared read-layer shift."""
    s = control_sums(theta, trainable, base, batch, scales, read_scale, spec=spec, cfg=cfg, lcfg=lcfg)
    loss = jnp.sum(s.nll) / jnp.maximum(s.count, 1.0)
    if spec.penalty > 0:
        loss = loss + spec.penalty * s.shift / jnp.maximum(s.positions, 1.0)
    return loss, s


def project_to_budget(theta: dict, spec: ControlSpec) -> dict:
    """Vectors scaled back into the ball ||v|| <= spec.max_norm (units of the typical norm; 0: no limit)."""
    if spec.method != "vectors" or spec.max_norm <= 0:
        return theta
    v = theta["vectors"]
    norm = jnp.sqrt(jnp.sum(jnp.square(v), axis=-1, keepdims=True))
    return {"vectors": v * jnp.minimum(1.0, spec.max_norm / jnp.maximum(norm, 1e-12))}


def make_optimizer(spec: ControlSpec, ccfg: ControlConfig, hidden_size: int) -> optax.GradientTransformation:
    """Adam: vectors at vector_lr / sqrt(D) per coordinate (a step moves a vector by about
    vector_lr typical norms), adapters at lora_lr."""
    lr = ccfg.vector_lr / np.sqrt(hidden_size) if spec.method == "vectors" else ccfg.lora_lr
    return optax.adam(lr)


def make_train_step(optimizer: optax.GradientTransformation, spec: ControlSpec, cfg: ModelConfig, lcfg: LitConfig):
    """A jitted step (theta, opt_state, trainable, base, batch, scales, read_scale) -> (theta, opt_state,
    loss, sums): value_and_grad of `control_loss` w.r.t. theta, an optimizer update, the budget
    projection. One compilation per batch shape (theta and the optimizer state are donated)."""

    def step(theta, opt_state, trainable, base, batch, scales, read_scale):
        (loss, sums), grads = jax.value_and_grad(control_loss, has_aux=True)(
            theta, trainable, base, batch, scales, read_scale, spec=spec, cfg=cfg, lcfg=lcfg)
        updates, opt_state = optimizer.update(grads, opt_state, theta)
        theta = project_to_budget(optax.apply_updates(theta, updates), spec)
        return theta, opt_state, loss, sums

    return jax.jit(step, donate_argnums=(0, 1))


eval_sums = jax.jit(control_sums, static_argnames=("spec", "cfg", "lcfg"))


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def _stream_norms(base, tokens, valid, *, cfg: ModelConfig, layers: tuple[int, ...]) -> jax.Array:
    """L2 norms float32 [n, B, R] of the residual stream after each of `layers` (sorted)."""
    hs = read_residual_stream(base, tokens, cfg, layers, valid=valid)
    return l2_norm(hs)[..., 0]


def typical_norms(base: llama.Params, reads: Sequence[tuple[np.ndarray, np.ndarray]], layers: Sequence[int],
                  cfg: ModelConfig, pad_id: int, batch_size: int = 8) -> dict[int, float]:
    """{layer: median L2 norm of the unsteered residual stream after that block} over every
    token of `reads` (the median ignores the few outsized attention-sink tokens). Fixed batch
    shape (one compilation)."""
    layers = tuple(sorted({int(x) for x in layers}))
    length = round_up(max(len(t) for t, _ in reads), 16)
    norms: list[list[np.ndarray]] = [[] for _ in layers]
    for lo in range(0, len(reads), batch_size):
        chunk = reads[lo: lo + batch_size]
        tokens = np.full((batch_size, length), pad_id, np.int32)
        valid = np.zeros((batch_size, length), bool)
        for i, (t, _) in enumerate(chunk):
            tokens[i, : len(t)], valid[i, : len(t)] = t, True
        out = np.asarray(_stream_norms(base, tokens, valid, cfg=cfg, layers=layers))
        for k in range(len(layers)):
            norms[k].append(out[k][valid])
    return {layer: float(np.median(np.concatenate(n))) for layer, n in zip(layers, norms)}


# ----------------------------------------------------------------------------- optimisation


class ControlResult(NamedTuple):
    """What `optimize_control` found: theta (vectors in typical-norm units, or target adapters),
    the spec, the typical norms {layer: norm}, metrics before/after per split, the loss history,
    and the Steering to generate with."""

    theta: dict
    spec: ControlSpec
    norms: dict[int, float]
    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    history: list[float]
    steering: Steering


def _metrics(sums: list[ControlSums], spec: ControlSpec) -> dict[str, float]:
    nll = np.sum([np.asarray(s.nll) for s in sums], axis=0)
    hits = np.sum([np.asarray(s.hits) for s in sums], axis=0)
    count = max(float(np.sum([float(s.count) for s in sums])), 1.0)
    out = {"answer_loss": float(nll[-1] / count), "accuracy": float(hits[-1] / count), "tokens": count}
    if spec.per_layer:
        out["loss_per_layer"] = [float(x / count) for x in nll]
        out["summed_loss"] = float(np.sum(nll) / count)
    positions = max(float(np.sum([float(s.positions) for s in sums])), 1.0)
    if spec.penalty > 0:
        out["relative_shift"] = float(np.sum([float(s.shift) for s in sums]) / positions)
    return out


def evaluate_control(theta: dict, decoder: Any, examples: Sequence[dict], bucket: Bucket, scales, read_scale,
                     spec: ControlSpec) -> dict[str, float]:
    """Decoder answer loss (read layer), token accuracy (and per-layer losses, shift) over `examples`."""
    pad_id, sums = _pad_id(decoder.tokenizer), []
    for lo in range(0, len(examples), bucket.rows):
        batch = make_batch(examples[lo: lo + bucket.rows], bucket, pad_id, spec.read_layer)
        sums.append(eval_sums(theta, decoder.trainable, decoder.base, batch, scales, read_scale, spec=spec,
                              cfg=decoder.cfg, lcfg=decoder.lcfg))
    return _metrics(sums, spec)


def _pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)


def _spread(items: Sequence[Any], n: int) -> list[Any]:
    """n items evenly spread over `items` (all of them for n = 0 or n >= len)."""
    if n == 0 or n >= len(items):
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def control_spec(decoder: Any, ccfg: ControlConfig) -> ControlSpec:
    """The spec of a control run for a loaded decoder. Raises ValueError for a read layer the
    decoder was not trained on, steering layers out of range (check_layers), a decoder trained
    on zeroed activations (it ignores them: nothing to steer) or on several layers read together."""
    lcfg, cfg = decoder.lcfg, decoder.cfg
    if lcfg.ablate != "none":
        raise ValueError(f"the decoder was trained with lit.ablate={lcfg.ablate!r}: it ignores the activations, so "
                         "its loss cannot steer them")
    if decoder.data_cfg.get("read_all_layers", False):
        raise ValueError(f"the decoder reads layers {lcfg.read_layers} together (data.read_all_layers): control "
                         "steers through a decoder that reads one layer per example")
    read_layer = lcfg.read_layers[0] if ccfg.read_layer < 0 else int(ccfg.read_layer)
    if read_layer not in lcfg.read_layers:
        raise ValueError(f"control.read_layer={read_layer}: the decoder was trained on layers {lcfg.read_layers}")
    layers = check_layers(ccfg.method, ccfg.layers, read_layer, cfg.num_layers)
    lora = (LoraConfig(ccfg.lora_rank, float(ccfg.lora_alpha), tuple(ccfg.lora_targets))
            if ccfg.method == "lora" else None)
    penalty = ccfg.vector_penalty if ccfg.method == "vectors" else ccfg.lora_penalty
    return ControlSpec(ccfg.method, layers, read_layer, bool(ccfg.per_layer), float(penalty),
                       float(ccfg.max_norm), lora)


def optimize_control(decoder: Any, qa: Sequence[tuple[str, str]], train_prompts: Sequence[str],
                     heldout_prompts: Sequence[str], ccfg: ControlConfig, *, seed: int = 0,
                     progress: bool = True) -> ControlResult:
    """Optimises a control (see the module docstring) for a loaded decoder (lit.trained.TrainedDecoder).

    Every batch has one fixed shape (all examples of both splits fit it): one compilation
    of the step. Raises ValueError (control_spec, control_examples, split sizes) before any
    optimisation, DataError for empty inputs.
    """
    from tqdm.auto import tqdm

    if not qa:
        raise DataError("no (question, answer) pairs to steer towards")
    if not train_prompts or not heldout_prompts:
        raise DataError(f"{len(train_prompts)} train and {len(heldout_prompts)} held-out prompts: need both")
    cfg, tok = decoder.cfg, decoder.tokenizer
    spec = control_spec(decoder, ccfg)
    fmt = DecoderFormat.create(tok, decoder.data_cfg)
    train, skipped_t = control_examples(tok, fmt, train_prompts, qa, spec.read_layer, ccfg.max_prompt_tokens)
    held, skipped_h = control_examples(tok, fmt, heldout_prompts, qa, spec.read_layer, ccfg.max_prompt_tokens)
    if skipped_t or skipped_h:
        print(f"skipped {skipped_t} train and {skipped_h} held-out prompt(s) longer than "
              f"control.max_prompt_tokens={ccfg.max_prompt_tokens}", flush=True)
    bucket = bucket_for(train + held, ccfg.batch_size)
    pad_id = _pad_id(tok)

    reads = [prompt_read(tok, p) for p in train_prompts]
    reads = [r for r in reads if len(r[0]) <= ccfg.max_prompt_tokens]
    norm_layers = tuple(spec.layers) + (spec.read_layer,) if spec.method == "vectors" else (spec.read_layer,)
    norms = typical_norms(decoder.base, reads, norm_layers, cfg, pad_id, ccfg.batch_size)
    scales = jnp.asarray([norms[x] for x in spec.layers] if spec.method == "vectors" else [], jnp.float32)
    read_scale = jnp.asarray(norms[spec.read_layer], jnp.float32)

    theta = init_theta(jax.random.key(seed), spec, cfg)
    eval_sets = {"train": _spread(train, ccfg.eval_examples), "heldout": _spread(held, ccfg.eval_examples)}
    evaluate = lambda th: {k: evaluate_control(th, decoder, v, bucket, scales, read_scale, spec)  # noqa: E731
                           for k, v in eval_sets.items()}
    before = evaluate(theta)

    optimizer = make_optimizer(spec, ccfg, cfg.hidden_size)
    opt_state = optimizer.init(theta)
    step = make_train_step(optimizer, spec, cfg, decoder.lcfg)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    history = []
    bar = tqdm(range(ccfg.steps), desc=f"control ({spec.method})", disable=not progress, dynamic_ncols=True)
    for i in bar:
        while len(order) < bucket.rows:
            order.extend(rng.permutation(len(train)).tolist())
        idx, order = order[: bucket.rows], order[bucket.rows:]
        batch = make_batch([train[j] for j in idx], bucket, pad_id, spec.read_layer)
        theta, opt_state, loss, _ = step(theta, opt_state, decoder.trainable, decoder.base, batch, scales, read_scale)
        history.append(loss)
        if i % 5 == 4 or i == ccfg.steps - 1:
            bar.set_postfix(loss=f"{float(loss):.3f}")
    history = [float(x) for x in history]
    after = evaluate(theta)
    return ControlResult(theta, spec, norms, before, after, history, steering_of(theta, scales, spec, cfg))


# ----------------------------------------------------------------------------- saving and loading


class LoadedSteering(NamedTuple):
    """A saved control: the Steering to generate with, and its settings (steering.json)."""

    steering: Steering
    settings: dict


def steering_tensors(result: ControlResult) -> dict[str, np.ndarray]:
    """What is saved: {"vectors": float32 [len(layers), D]} in the residual stream's units, or
    {"lora.<projection>.a" [read_layer + 1, r, in], "lora.<projection>.b" [read_layer + 1, r, out]}."""
    if result.spec.method == "vectors":
        scales = np.asarray([result.norms[x] for x in result.spec.layers], np.float32)
        return {"vectors": np.asarray(result.theta["vectors"], np.float32) * scales[:, None]}
    return {f"lora.{name}.{part}": np.asarray(ab[part], np.float32)
            for name, ab in result.theta["lora"].items() for part in ("a", "b")}


def _write_dir_atomically(directory: str, files: dict[str, Any]) -> None:
    """Writes {name: writer(path)} as `directory`, all or nothing (lit_jax.atomic_dir)."""
    write_directory(directory, lambda tmp: [write(os.path.join(tmp, name)) for name, write in files.items()])


def save_steering(directory: str, result: ControlResult, extra: dict | None = None) -> str:
    """Writes `directory`/steering.safetensors (steering_tensors) and steering.json (method, layers,
    read layer, model shape, typical and vector norms, losses before/after, `extra`: decoder path,
    control file, steps, ...), atomically (a previous result there is replaced whole or not at all).
    Returns the directory."""
    from safetensors.numpy import save_file

    spec = result.spec
    tensors = steering_tensors(result)
    settings = {
        "version": SETTINGS_VERSION, "method": spec.method, "layers": list(spec.layers),
        "read_layer": spec.read_layer, "per_layer": spec.per_layer, "penalty": spec.penalty,
        "max_norm": spec.max_norm if spec.method == "vectors" else None,
        "num_layers": int(result.steering.vectors.shape[0]) if spec.method == "vectors" else
        int(jax.tree.leaves(result.steering.lora.params)[0].shape[0]),
        "hidden_size": int(next(iter(tensors.values())).shape[-1]) if spec.method == "vectors" else None,
        "lora": None if spec.lora is None else {"rank": spec.lora.rank, "alpha": spec.lora.alpha,
                                                "targets": list(spec.lora.targets)},
        "typical_norms": {str(k): v for k, v in result.norms.items()},
        "loss_before": result.before, "loss_after": result.after,
        "loss_history": result.history, **(extra or {}),
    }
    if spec.method == "vectors":
        v = tensors["vectors"]
        settings["vector_norms"] = [float(x) for x in np.linalg.norm(v, axis=-1)]
        settings["relative_norms"] = [float(x / result.norms[layer]) for x, layer in
                                      zip(np.linalg.norm(v, axis=-1), spec.layers)]

    def write_json(path):
        with open(path, "w", encoding="utf-8") as f:
            json.dump(settings, f, indent=2, default=str)

    _write_dir_atomically(directory, {
        STEERING_FILE: lambda path: save_file(tensors, path, metadata={"format": "lit_jax.steering",
                                                                       "method": spec.method}),
        SETTINGS_FILE: write_json,
    })
    return directory


def load_steering(directory: str, cfg: ModelConfig | None = None) -> LoadedSteering:
    """A result `save_steering` wrote, as a Steering for lit_jax.generate (`steering=`).

    cfg: the model it will steer; its shape is checked. Raises FileNotFoundError (no such
    directory or file), ValueError naming the field for an unknown format, or a model of
    another depth / width / projection shapes.
    """
    from safetensors.numpy import load_file

    settings_path, tensors_path = os.path.join(directory, SETTINGS_FILE), os.path.join(directory, STEERING_FILE)
    for path in (settings_path, tensors_path):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} is not a saved control: it has no {os.path.basename(path)}")
    with open(settings_path, encoding="utf-8") as f:
        settings = json.load(f)
    if settings.get("version") != SETTINGS_VERSION or settings.get("method") not in METHODS:
        raise ValueError(f"{settings_path}: unknown format (version {settings.get('version')!r}, "
                         f"method {settings.get('method')!r})")
    tensors = load_file(tensors_path)
    num_layers = int(settings["num_layers"])
    if cfg is not None and cfg.num_layers != num_layers:
        raise ValueError(f"{directory}: the control was made for a model of {num_layers} layers; this one has "
                         f"{cfg.num_layers}")
    if settings["method"] == "vectors":
        v = tensors["vectors"]
        if cfg is not None and v.shape[-1] != cfg.hidden_size:
            raise ValueError(f"{directory}: steering vectors of width {v.shape[-1]}; this model's hidden size is "
                             f"{cfg.hidden_size}")
        return LoadedSteering(Steering(vectors=dense_vectors(settings["layers"], jnp.asarray(v), num_layers)),
                              settings)
    lora = settings["lora"]
    params: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, name, part = key.split(".")
        params.setdefault(name, {})[part] = value
    dims = projection_dims(cfg) if cfg is not None else None
    for name, ab in params.items():
        if dims is not None and (ab["a"].shape[-1], ab["b"].shape[-1]) != dims[name]:
            raise ValueError(f"{directory}: adapter {name!r} maps {ab['a'].shape[-1]} -> {ab['b'].shape[-1]}; "
                             f"this model's {name} maps {dims[name][0]} -> {dims[name][1]}")
        for part in ("a", "b"):
            a = ab[part]
            ab[part] = jnp.asarray(np.concatenate([a, np.zeros((num_layers - a.shape[0], *a.shape[1:]), a.dtype)]))
    return LoadedSteering(Steering(lora=LoraWeights(params, float(lora["alpha"]) / int(lora["rank"]))), settings)


# ----------------------------------------------------------------------------- the `control` task


def run_control(config: Any, workdir: str) -> dict:
    """The `control` task (configs/control.py): load the decoder, optimise, report, save.

    Prints the decoder loss before/after on train and held-out prompts and a few held-out
    generations before/after; writes the result to control.out (default
    <workdir>/<control file stem>_<method>[_per_layer]). Returns its settings.
    """
    from lit_jax.generate import SamplingConfig, chat
    from lit_jax.lit.trained import load_decoder
    from lit_jax.settings import from_section

    ccfg = from_section(ControlConfig, config.control, "control")
    ccfg = dataclasses.replace(ccfg, layers=tuple(int(x) for x in ccfg.layers),
                               lora_targets=tuple(ccfg.lora_targets))
    if not config.decoder:
        raise ValueError("config.decoder is not set: pass --config.decoder=WORKDIR (a `lit` run's work dir)")
    qa = read_control_file(ccfg.file)
    train_prompts, heldout_prompts = split_prompts(read_prompts(ccfg.prompts), ccfg.num_train, ccfg.num_heldout,
                                                   int(config.seed))
    decoder = load_decoder(config.decoder, step=None if config.decoder_step < 0 else int(config.decoder_step),
                           target=config.target or None)
    control_spec(decoder, ccfg)  # layer / read-layer errors before the long part
    print(f"decoder {decoder.path} (step {decoder.step}, reads layer(s) {decoder.lcfg.read_layers}); control "
          f"{ccfg.file}: {len(qa)} QA pairs; {len(train_prompts)} train / {len(heldout_prompts)} held-out prompts; "
          f"method {ccfg.method}", flush=True)
    result = optimize_control(decoder, qa, train_prompts, heldout_prompts, ccfg, seed=int(config.seed))
    spec = result.spec
    print(f"\nsteered blocks {list(spec.layers)}, read layer {spec.read_layer}"
          + (", per-layer loss" if spec.per_layer else ""), flush=True)
    for split in ("train", "heldout"):
        b, a = result.before[split], result.after[split]
        print(f"  decoder loss on the desired answers, {split:8s}: {b['answer_loss']:.4f} -> {a['answer_loss']:.4f}"
              f"   (token accuracy {b['accuracy']:.3f} -> {a['accuracy']:.3f})", flush=True)

    shown = heldout_prompts[: ccfg.num_generations]
    generations = []
    if shown:
        sampling = SamplingConfig(max_new_tokens=ccfg.max_new_tokens)
        plain = chat(decoder.base, decoder.cfg, decoder.tokenizer, shown, sampling=sampling, seed=int(config.seed))
        steered = chat(decoder.base, decoder.cfg, decoder.tokenizer, shown, sampling=sampling, seed=int(config.seed),
                       steering=result.steering)
        print("\nGenerations on held-out prompts, before -> after:", flush=True)
        for p, b, a in zip(shown, plain, steered):
            print(f"\n  prompt:  {p}\n  before:  {b}\n  after:   {a}", flush=True)
            generations.append({"prompt": p, "before": b, "after": a})

    stem = os.path.splitext(os.path.basename(ccfg.file))[0]
    out = ccfg.out or os.path.join(workdir, f"{stem}_{ccfg.method}{'_per_layer' if spec.per_layer else ''}")
    extra = {"decoder": decoder.path, "decoder_step": decoder.step, "control_file": os.path.abspath(ccfg.file),
             "prompts": os.path.abspath(ccfg.prompts), "num_train_prompts": len(train_prompts),
             "num_heldout_prompts": len(heldout_prompts), "steps": ccfg.steps, "batch_size": ccfg.batch_size,
             "lr": ccfg.vector_lr if ccfg.method == "vectors" else ccfg.lora_lr, "seed": int(config.seed),
             "generations": generations}
    save_steering(out, result, extra)
    print(f"\nsaved {out} ({STEERING_FILE}, {SETTINGS_FILE}); generate with it: "
          f"--config=configs/smollm2_chat.py --config.chat.steering={out}", flush=True)
    return load_steering(out).settings
