"""The command line: the default config loads, runs, and a mistyped override is an error."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(*args):
    return subprocess.run([sys.executable, "-m", "lit_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_unknown_override_is_an_error():
    r = _main("--config=configs/smollm2_chat.py", "--config.chat.no_such_key=1")
    assert r.returncode != 0
    assert "no_such_key" in r.stderr


def test_default_job_answers_with_smollm2():
    r = _main("--config=configs/smollm2_chat.py", "--config.chat.max_new_tokens=12",
              "--config.chat.questions=('What is the capital of France?',)")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Paris" in r.stdout
