"""A SmolLM2 decoder that reads three target layers at once (Activation-Oracles prompt).

Every example reads layers 9, 15 and 21 of the same span: one "Layer: L" line and placeholder
run per layer, so the decoder sees all three and reading asks about them together
(`lit_jax.load_decoder(workdir).reader().ask(...)` reads all three by default). Activations
are added norm-matched after block 1, as Activation Oracles does.
"""

from configs.smollm2_demo import get_config as demo_config


def get_config(arg: str | None = None):
    c = demo_config(arg)
    c.data.prompt_style = "oracle"
    c.data.read_layers = (9, 15, 21)
    c.data.read_all_layers = True
    c.lit.write_mode = "add_norm_matched"
    c.lit.write_layer = 1
    return c
