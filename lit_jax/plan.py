"""The `plan` task: what a LIT run needs per device, computed here before renting the hardware.

    python -m lit_jax.main --config=configs/llama3_8b.py --config.task=plan \
        --config.plan.devices=256 --config.mesh.shape='(1,256,1)' --config.plan.device_memory_gb=16

The train step and the reading function (batched generation) are compiled for the run's mesh
on abstract inputs (`jax.ShapeDtypeStruct`s carrying the shardings training uses: no weights
are loaded or allocated), over `plan.devices` fake CPU devices. XLA's memory analysis of each
compiled per-device program gives arguments, outputs, the part of the outputs that reuses
donated arguments, and temporaries; the collectives are read from the partitioned program,
each counted as often as it runs (a while loop's body times its known trip count: the scan
over layers). It is XLA:CPU's compilation of the same sharded program: the partitioning, and
so the weights, optimizer state, batch and collectives per device, are what a GPU or TPU
gets; temporaries depend on each backend's fusion and scheduling, so treat them as an
estimate (the GPU/TPU compilers fuse more, and rematerialise as `model.remat` says on all).
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections import defaultdict
from typing import Any

import jax
import numpy as np

GB = 1e9


@dataclasses.dataclass(frozen=True)
class PlanSettings:
    """devices: fake CPU devices to plan for (0: the devices this process has); device_memory_gb:
    each device's memory (0: unknown, no fits/does-not-fit verdict); model_config: an HF config.json
    to plan with (""= the one model.source names; lets a plan run where the weights are not);
    train rows come from data.batch_size, each with read_tokens target tokens (slots of them
    written into the decoder), decoder_tokens decoder tokens and target_tokens answer tokens;
    reading: reading_batch reads of read_tokens tokens, a reading_prompt_tokens decoder prompt,
    reading_new_tokens generated; skip_reading: plan the train step only."""

    devices: int = 0
    device_memory_gb: float = 0.0
    model_config: str = ""
    read_tokens: int = 256
    slots: int = 128
    decoder_tokens: int = 320
    target_tokens: int = 64
    reading_batch: int = 32
    reading_prompt_tokens: int = 64
    reading_new_tokens: int = 32
    skip_reading: bool = False


def use_fake_devices(n: int) -> None:
    """Makes this process's CPU backend have `n` devices (before JAX starts; tests and the plan task).

    Raises RuntimeError when the backend already started with another count: the plan must then
    run in a new process (`python -m lit_jax.main ... --config.task=plan`).
    """
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        if jax.device_count() != n:
            raise RuntimeError(f"--config.plan.devices={n}: this process already has {jax.device_count()} "
                               "devices; run the plan in a new process")
        return
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", n)


# ----------------------------------------------------------------------------- collectives

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
          "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%\S+\s*=\s*(.*?)\s([a-z][a-z0-9-]*)\(")
_CALLED = re.compile(r"\b(body|calls|to_apply|condition|true_computation|false_computation)=%([\w.-]+)")


def _array_bytes(shape_text: str) -> list[int]:
    return [_BYTES.get(dt, 4) * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
            for dt, dims in _ARRAY.findall(shape_text)]


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
    """{op: {"count": executions per call, "gb": result GB per device per call}} of a compiled
    (partitioned) HLO module's text, each instruction weighted by how often its computation runs
    (while bodies by their known_trip_count; an unknown count is taken as 1). Async pairs are
    counted at their -start (the largest array of its result tuple)."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split("(")[0].split()
            name = head[-1].lstrip("%")
            current = comps.setdefault(name, [])
            if head[0] == "ENTRY":
                entry = name
        elif current is not None and line.strip() and line.strip() != "}":
            current.append(line)
    if entry is None:
        return {}
    times: dict[str, float] = defaultdict(float)

    def visit(name: str, n: float) -> None:
        times[name] += n
        for line in comps.get(name, ()):
            trips = 1.0
            m = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            if " while(" in line and m:
                trips = float(m.group(1))
            for key, called in _CALLED.findall(line):
                visit(called, n * (trips if key == "body" else 1.0))
            for branch in re.findall(r"branch_computations=\{([^}]*)\}", line):
                for called in re.findall(r"%([\w.-]+)", branch):
                    visit(called, n)

    visit(entry, 1.0)
    out: dict[str, dict[str, float]] = {}
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            op = m.group(2)
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base not in COLLECTIVES or times[name] == 0:
                continue
            sizes = _array_bytes(m.group(1))
            nbytes = max(sizes) if op.endswith("-start") else sum(sizes)
            entry_ = out.setdefault(base, {"count": 0.0, "gb": 0.0})
            entry_["count"] += times[name]
            entry_["gb"] += times[name] * nbytes / GB
    return out


# ----------------------------------------------------------------------------- abstract inputs


def _with(like: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), like, shardings)


def _placed(shardings: Any, mesh) -> Any:
    from lit_jax import sharding as shd

    return jax.tree.map(lambda s: s if isinstance(s, jax.sharding.NamedSharding) else shd.replicated(mesh),
                        shardings)


def shard_gb(tree: Any) -> float:
    """GB one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard per leaf)."""
    return sum(int(np.prod(x.sharding.shard_shape(x.shape))) * np.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree)) / GB


def _memory(compiled) -> dict[str, float]:
    m = compiled.memory_analysis()
    args, outs, alias, temp = (m.argument_size_in_bytes / GB, m.output_size_in_bytes / GB,
                               m.alias_size_in_bytes / GB, m.temp_size_in_bytes / GB)
    return {"arguments_gb": args, "outputs_gb": outs, "aliased_gb": alias, "temporaries_gb": temp,
            "peak_gb": args + outs - alias + temp}


def model_config_for(config) -> Any:
    """The ModelConfig a plan uses: plan.model_config's config.json, else model.source's (no weights read)."""
    from lit_jax.hf.smollm2 import resolve_model_path
    from lit_jax.lit.job import model_header
    from lit_jax.models.config import ModelConfig, from_hf_dict, load_hf_config
    from lit_jax.settings import model_run_options

    run = model_run_options(config.model)
    path = config.plan.model_config
    if path:
        with open(path) as f:
            return from_hf_dict(json.load(f), source=path, **run)
    m = config.model
    if m.source == "random":
        from lit_jax.hf import load_tokenizer

        tok = load_tokenizer(resolve_model_path(m.tokenizer))
        return ModelConfig(architecture="LlamaForCausalLM", vocab_size=len(tok), **dict(m.random), **run)
    _, reader = model_header(m)
    path = resolve_model_path(m.source)
    if reader is not None:
        from lit_jax.hf.gguf_in import config_from_gguf

        return config_from_gguf(reader, path, **run)
    return load_hf_config(path, **run)


def plan(config) -> dict:
    """Compiles the train step (and reading) of `config` for its mesh over this process's devices.

    Returns {"mesh", "devices", "model", "train": {"memory": {...GB per device}, "state_gb",
    "base_gb", "batch_gb", "collectives": {...}, "compile_s"}, "reading": {...} or None}.
    Raises ValueError (config_checks) for settings the run would refuse.
    """
    from lit_jax import sharding as shd
    from lit_jax.config_checks import check_lit_against, check_lit_settings
    from lit_jax.lit.job import lit_config, train_config
    from lit_jax.lit.train_state import init_state, init_trainable, make_optimizer, trainable_axes
    from lit_jax.models import llama
    from lit_jax.settings import MeshConfig, from_section

    check_lit_settings(config)
    settings = from_section(PlanSettings, config.plan, "plan")
    cfg = model_config_for(config)
    check_lit_against(config, num_layers=cfg.num_layers, device_count=jax.device_count(),
                      process_count=jax.process_count())
    lcfg, tcfg = lit_config(config), train_config(config)
    mesh_cfg = from_section(MeshConfig, config.mesh, "mesh")
    mesh = shd.make_mesh(mesh_cfg.shape)
    units = llama.param_units(cfg)

    base = llama.param_shapes(cfg)
    base = _with(base, shd.tree_shardings(llama.param_axes(cfg), base, mesh, units=units, strict=mesh_cfg.strict))
    optimizer = make_optimizer(tcfg.lr, tcfg.warmup_steps, tcfg.steps, weight_decay=tcfg.weight_decay,
                               clip_norm=tcfg.clip_norm)
    params = jax.eval_shape(lambda: init_trainable(jax.random.key(0), cfg, lcfg, base))
    params = _with(params, shd.tree_shardings(trainable_axes(cfg, lcfg), params, mesh, units=units,
                                              strict=mesh_cfg.strict))
    # the layout train() gives the state: optimizer moments follow their parameters, counters replicated
    init = jax.jit(lambda p: init_state(p, optimizer)).lower(params).compile()
    state = _with(jax.eval_shape(lambda p: init_state(p, optimizer), params), _placed(init.output_shardings, mesh))

    with shd.mesh_rules(mesh):  # the activation constraints training compiles with
        return _compile(config, settings, cfg, lcfg, tcfg, mesh, base, params, state, optimizer)


def _compile(config, settings, cfg, lcfg, tcfg, mesh, base, params, state, optimizer) -> dict:
    import time

    from lit_jax import sharding as shd
    from lit_jax.data import plain_batch
    from lit_jax.data.batch import Slots, chains
    from lit_jax.generate import SamplingConfig
    from lit_jax.lit.read import answer_tokens
    from lit_jax.lit.train_step import jit_train_step
    from lit_jax.models import llama

    B, R, S, T, P = (config.data.batch_size, settings.read_tokens, settings.slots, settings.decoder_tokens,
                     settings.target_tokens)
    rows = {"read_tokens": (R, np.int32), "read_valid": (R, bool), "read_positions": (S, np.int32),
            "slot_mask": (S, bool), "decoder_tokens": (T, np.int32), "decoder_valid": (T, bool),
            "write_positions": (S, np.int32), "target_positions": (P, np.int32), "target_mask": (P, bool),
            "read_layer": (None, np.int32)}
    rows = {k: np.zeros((B,) + ((n,) if n else ()), dt) for k, (n, dt) in rows.items()}
    batch = plain_batch(rows)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.batch_sharding(mesh, x.ndim)),
                         batch)

    t0 = time.time()
    step = jit_train_step(cfg, lcfg, optimizer, tcfg.accum_steps,
                          out_shardings=(jax.tree.map(lambda x: x.sharding, state), shd.replicated(mesh)))
    compiled = step.lower(state, base, batch).compile()
    train = {"memory": _memory(compiled), "state_gb": shard_gb(state), "base_gb": shard_gb(base),
             "batch_gb": shard_gb(batch), "collectives": collectives(compiled.as_text()),
             "compile_s": time.time() - t0, "rows": B, "read_tokens": R, "decoder_tokens": T}

    reading = None
    if not settings.skip_reading:
        n, Rr, Tp = settings.reading_batch, settings.read_tokens, settings.reading_prompt_tokens
        rows_split = n % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0  # else the reads are replicated

        def bs(shape, dt):
            return jax.ShapeDtypeStruct(shape, dt, sharding=shd.batch_sharding(mesh, len(shape)) if rows_split
                                        else shd.replicated(mesh))

        read = chains(np.zeros((n, Rr), np.int32), np.ones((n, Rr), bool))
        read = jax.tree.map(lambda x: bs(x.shape, x.dtype), read)
        slots = Slots(*(bs((n, settings.slots), dt) for dt in (np.int32, np.int32, np.int32, bool)))
        t0 = time.time()
        fn = answer_tokens.lower(params, base, read, slots, bs((n, Tp), np.int32), bs((n, Tp), bool),
                                 jax.random.key(0), cfg=cfg, lcfg=lcfg,
                                 sampling=SamplingConfig(max_new_tokens=settings.reading_new_tokens),
                                 eos_ids=tuple(cfg.eos_token_ids) or (0,), pad_id=0).compile()
        reading = {"memory": _memory(fn), "collectives": collectives(fn.as_text()), "compile_s": time.time() - t0,
                   "reads": n, "new_tokens": settings.reading_new_tokens}
    return {"mesh": dict(mesh.shape), "devices": jax.device_count(), "platform": jax.devices()[0].platform,
            "device_memory_gb": settings.device_memory_gb, "model": cfg.architecture,
            "params_b": llama.num_params(llama.param_shapes(cfg)) / 1e9, "dtype": cfg.dtype, "remat": cfg.remat,
            "train": train, "reading": reading}


def report(result: dict) -> str:
    """The plan as a few lines of text: per-device GB by category, the verdict, the collectives per call."""
    mem_gb = result["device_memory_gb"]
    lines = [f"plan: {result['model']} ({result['params_b']:.2f} B params, {result['dtype']}, remat {result['remat']}) "
             f"on mesh {result['mesh']} ({result['devices']} devices; compiled by XLA:{result['platform'].upper()})"]
    for name in ("train", "reading"):
        part = result[name]
        if part is None:
            continue
        m = part["memory"]
        what = (f"train step ({part['rows']} rows x {part['read_tokens']} read + {part['decoder_tokens']} decoder "
                f"tokens)" if name == "train" else f"reading ({part['reads']} reads, {part['new_tokens']} new tokens)")
        verdict = ("" if not mem_gb else
                   f" -> {'fits' if m['peak_gb'] <= mem_gb else 'does NOT fit'} in {mem_gb:g} GB")
        lines.append(f"  {what}, per device GB: arguments {m['arguments_gb']:.2f}, outputs {m['outputs_gb']:.2f} "
                     f"(aliased {m['aliased_gb']:.2f}), temporaries {m['temporaries_gb']:.2f}; "
                     f"peak {m['peak_gb']:.2f}{verdict}")
        if name == "train":
            lines.append(f"    of the arguments: frozen base {part['base_gb']:.2f}, train state {part['state_gb']:.3f}, "
                         f"batch {part['batch_gb']:.4f}")
        coll = ", ".join(f"{op} x{v['count']:.0f} ({v['gb']:.2f} GB)" for op, v in sorted(part["collectives"].items()))
        lines.append(f"    collectives per call, per device: {coll or 'none'}; compiled in {part['compile_s']:.0f} s")
    return "\n".join(lines)


def run_plan(config, workdir: str) -> dict:
    """The `plan` task: use plan.devices fake CPU devices, compile, print the report, write plan.json
    into the work dir."""
    import os

    if config.plan.devices:
        use_fake_devices(int(config.plan.devices))
    result = plan(config)
    print(report(result), flush=True)
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "plan.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"written to {path}", flush=True)
    return result
