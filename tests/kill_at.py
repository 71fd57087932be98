"""Runs `python -m lit_jax.main ARGS` and SIGKILLs the process at a chosen point (resume tests).

    python tests/kill_at.py POINT STEP -- --config=configs/tiny.py --workdir=... [--config.x=y ...]

POINT is where the process dies, with no cleanup (SIGKILL, as a preempted host would):
  step   after the train step STEP's metrics are written (needs train.log_every=1), between saves;
  save   right after the checkpoint save of STEP starts, while the async write is in flight;
  saved  after the checkpoint of STEP is completely on disk.
"""

import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    point, step, sep, *args = sys.argv[1:]
    if sep != "--" or point not in ("step", "save", "saved"):
        raise SystemExit(__doc__)
    step = int(step)
    sys.path.insert(0, ROOT)
    from lit_jax.lit import checkpoint, metrics

    if point == "step":
        real_write = metrics.MetricsWriter.write

        def write(self, at, split, scalars):
            real_write(self, at, split, scalars)
            if split == "train" and at == step:
                _die()

        metrics.MetricsWriter.write = write
    else:
        real_save = checkpoint.Checkpointer.save

        def save(self, at, *a, **k):
            real_save(self, at, *a, **k)
            if at == step:
                if point == "saved":
                    self._mngr.wait_until_finished()
                _die()

        checkpoint.Checkpointer.save = save

    from absl import app

    from lit_jax import main as lit_main

    app.run(lit_main.main, argv=["lit_jax.main", *args])


if __name__ == "__main__":
    main()
