"""Evaluation of trained decoders: judge-free tasks, each against controls that show whether
the decoder reads the activations (zeros, shuffled, text-only, untrained), with intervals.

    from lit_jax.eval import evaluate_decoder
    results = evaluate_decoder(load_decoder("workdirs/smollm2_demo"), tasks=("hidden_system",))

Modules: stats (intervals), controls (the decoder variants), latentqa (held-out loss,
multiple choice, hidden system prompt), classification (the Activation Oracles protocol),
relations (decoder vs linear probe and Patchscope), report (tables and plots), harness
(runs the tasks).
"""

from __future__ import annotations


def __getattr__(name: str):
    if name in ("evaluate_decoder", "EvalSettings"):
        from lit_jax.eval import harness

        return getattr(harness, name)
    raise AttributeError(name)
