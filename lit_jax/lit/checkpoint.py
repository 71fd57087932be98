"""Train-state checkpoints with orbax: async, keep-N, atomic, resumable with the data iterator state.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed during a save leaves the previous checkpoint as the latest restorable
one. Before restoring, the saved parameter shapes are compared with what the config
builds, and a mismatch is refused with a message naming the array and both shapes.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """A checkpoint in the work dir was written for a different configuration."""


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

    def restore(self, step: int, like_state) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) at `step`, placed like `like_state` (same shardings)."""
        self._check_shapes(step, like_state.params)
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
