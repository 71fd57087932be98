"""lit_jax: LatentQA / Latent Interpretation Tuning in JAX.

`lit_jax.load_decoder(workdir)` loads a trained decoder (lit_jax/lit/trained.py); the
command line is `python -m lit_jax.main --config=configs/<name>.py`.
"""


def load_decoder(path, **kwargs):
    """See lit_jax.lit.trained.load_decoder (imported lazily: `import lit_jax` stays light)."""
    from lit_jax.lit.trained import load_decoder as load

    return load(path, **kwargs)
