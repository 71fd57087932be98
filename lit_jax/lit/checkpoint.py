"""Train-state checkpoints with orbax: async, keep-N, atomic, resumable with the data iterator state.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed during a save leaves the previous checkpoint as the latest restorable
one. Before restoring, the saved parameter shapes are compared with what the config
builds, and a mismatch is refused with a message naming the array and both shapes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


META_VERSION = 1
# ModelConfig fields that do not change what the weights mean (run-time choices, special token ids).
_MODEL_FIELDS_IGNORED = ("dtype", "scan_layers", "remat", "attention", "bos_token_id", "eos_token_ids",
                         "pad_token_id")
ALLOWED_CHANGES = ("train steps, learning-rate schedule, eval/log/checkpoint cadence, "
                   "run-time model options (dtype, scan_layers, remat, attention), sampling, demo, export")


class CheckpointMismatchError(ValueError):
    """A checkpoint in the work dir was written for a different configuration."""


def _jsonable(x: Any) -> Any:
    """Plain JSON values (tuples become lists), as a checkpoint's JSON meta round-trips them."""
    return json.loads(json.dumps(x))


def config_meta(cfg: Any, lcfg: Any, data: dict | None = None) -> dict:
    """Everything that changes what a run's saved parameters mean, as JSON, for the checkpoint meta.

    model: the architecture and shape fields of the ModelConfig (not its run-time options or
    special token ids); lit: the whole LitConfig (read/write layers, write mode, projection,
    norm matching, MLP width, LoRA rank/alpha/targets or null for a full fine-tune, ablation);
    data: what the caller adds about the decoder prompt (prompt style, placeholder, ...).
    """
    model = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _MODEL_FIELDS_IGNORED}
    model = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for k, v in model.items()}
    return _jsonable({"version": META_VERSION, "model": model, "lit": dataclasses.asdict(lcfg), "data": data or {}})


_MISSING = "<not recorded>"


def _lit_repr(lit: dict) -> str:
    """repr of the LitConfig a config_meta's "lit" section describes (legacy metas saved that)."""
    from lit_jax.lit.config import LitConfig
    from lit_jax.models.lora import LoraConfig

    values = {**lit, "read_layers": tuple(lit["read_layers"])}
    if lit.get("lora") is not None:
        values["lora"] = LoraConfig(**{**lit["lora"], "targets": tuple(lit["lora"]["targets"])})
    return repr(LitConfig(**values))


def _diff(saved: Any, current: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for k in sorted(set(saved) | set(current)):
            out += _diff(saved.get(k, _MISSING), current.get(k, _MISSING), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if saved == current else [(prefix, saved, current)]


def check_config_meta(saved_meta: dict | None, current: dict, where: str) -> None:
    """Refuses a checkpoint whose saved config meta (see config_meta) differs from `current`.

    Raises CheckpointMismatchError naming each differing field with its saved and current
    values (e.g. `lit.lora.alpha: saved 8.0, current 4.0`). A checkpoint saved before the
    structured meta existed is compared by its LitConfig repr and architecture; one with no
    meta at all cannot be compared and is accepted (its parameter shapes are still checked).
    Fields `current` does not describe are not compared; fields only `current` has are refused
    (the checkpoint cannot show it was trained so).
    """
    saved_meta = saved_meta or {}
    saved = saved_meta.get("config")
    if saved is None:  # saved before the structured meta: {"architecture": str, "lit": repr(LitConfig)}
        if "lit" not in saved_meta:
            return
        diffs = []
        if saved_meta.get("architecture") not in (None, current["model"]["architecture"]):
            diffs.append(("model.architecture", saved_meta["architecture"], current["model"]["architecture"]))
        current_repr = _lit_repr(current["lit"])
        if saved_meta["lit"] != current_repr:
            diffs.append(("lit", saved_meta["lit"], current_repr))
    else:
        # a field the current run does not describe (e.g. no data section from the train() API) is not compared
        diffs = [d for d in _diff(saved, _jsonable(current), "") if d[0] != "version" and d[2] != _MISSING]
    if diffs:
        lines = "\n".join(f"  {name}: saved {s!r}, current {c!r}" for name, s, c in diffs)
        raise CheckpointMismatchError(
            f"checkpoint {where} was trained with a different configuration; these fields change what its "
            f"parameters mean:\n{lines}\nUse a fresh --workdir, or the configuration it was trained with "
            f"(what may change on resume: {ALLOWED_CHANGES})."
        )


def _abstract(tree: Any) -> Any:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


def _as_tree(state) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


class Checkpointer:
    """One per work dir and process. `clean_partial` removes half-written step dirs left by a
    crash; only the writer should do that, so read-only probes (`latest_step_in`) pass False
    and never race the writer's cleanup."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 clean_partial: bool = True):
        self.directory = os.path.abspath(directory)
        self._mngr = ocp.CheckpointManager(
            self.directory,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                           "meta": ocp.JsonCheckpointHandler()},
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=clean_partial,
            ),
        )

    def latest_step(self) -> int | None:
        return self._mngr.latest_step()

    @staticmethod
    def latest_step_in(directory: str) -> int | None:
        """Latest complete step in `directory`, touching nothing there."""
        probe = Checkpointer(directory, clean_partial=False)
        try:
            return probe.latest_step()
        finally:
            probe.close()

    def save(self, step: int, state, data_state: dict, meta: dict | None = None) -> None:
        """Starts saving (returns before the bytes are on disk when async)."""
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_as_tree(state)),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta or {}),
        ), force=True)

    def _check_shapes(self, step: int, expected: dict) -> None:
        saved = self._mngr.item_metadata(step)["state"]
        saved = getattr(saved, "tree", saved)["params"]
        where = f"{self.directory}/{step}"
        exp_flat = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree.leaves_with_path(expected)}
        got_flat = {jax.tree_util.keystr(p): tuple(x.shape) for p, x in jax.tree.leaves_with_path(saved)}
        if set(exp_flat) != set(got_flat):
            extra, missing = sorted(set(got_flat) - set(exp_flat)), sorted(set(exp_flat) - set(got_flat))
            raise CheckpointMismatchError(
                f"checkpoint {where} does not match the config: saved-only params {extra[:5]}, "
                f"config-only params {missing[:5]} (use a fresh --workdir or the config it was trained with)"
            )
        for key, shape in exp_flat.items():
            if tuple(shape) != got_flat[key]:
                raise CheckpointMismatchError(
                    f"checkpoint {where}: param {key} has shape {got_flat[key]}, the config builds {tuple(shape)} "
                    "(use a fresh --workdir or the config it was trained with)"
                )

    def read_meta(self, step: int) -> dict:
        """The JSON meta saved with `step` ({} if none was saved)."""
        out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(out["meta"] or {})

    def restore(self, step: int, like_state, expected_config: dict | None = None) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) at `step`, placed like `like_state` (same shardings).

        expected_config: the current run's config_meta; the saved one must match it (compared
        before anything is read). Raises CheckpointMismatchError naming the differing config
        fields and/or the first parameter whose saved shape differs from `like_state`'s.
        """
        errors = []
        for check in ((lambda: check_config_meta(self.read_meta(step), expected_config, f"{self.directory}/{step}"))
                      if expected_config is not None else None,
                      lambda: self._check_shapes(step, like_state.params)):
            try:
                check and check()
            except CheckpointMismatchError as e:
                errors.append(str(e))
        if errors:  # both: the config fields say why, the shapes say what no longer fits
            raise CheckpointMismatchError("\n".join(errors))
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_abstract(_as_tree(like_state))),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ))
        tree = out["state"]
        state = type(like_state)(tree["step"], tree["params"], tree["opt_state"])
        return state, out["data"], out["meta"]

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()


def restore_params(directory: str, step: int, like: Any) -> dict:
    """Only the parameters of the train state saved at `step` in `directory` (no optimizer state).

    like: the params tree of jax.ShapeDtypeStructs; each leaf comes back as a jax.Array with its
    `sharding` (any mesh: orbax reads each device's block of the saved array, whatever mesh
    saved it), or as numpy where it has none, in its dtype. Reads only; touches nothing in
    `directory`. Raises CheckpointMismatchError when a saved parameter's shape or the tree
    differs from `like`.
    """
    probe = Checkpointer(directory, clean_partial=False)
    try:
        probe._check_shapes(step, like)
    finally:
        probe.close()
    target = {"params": like}
    # The pytree handler (the format the standard handler writes) restores a part of the state.
    with ocp.CheckpointManager(os.path.abspath(directory), item_handlers={"state": ocp.PyTreeCheckpointHandler()},
                               options=ocp.CheckpointManagerOptions(read_only=True)) as mngr:
        out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True)))
    return out["state"]["params"]

