"""Export a trained decoder as an HF PEFT LoRA adapter and/or a merged HF model (task `export`).

    python -m lit_jax.main --config=configs/export.py --config.decoder=workdirs/smollm2_demo \
        --config.export.peft_dir=exports/demo_peft [--config.export.hf_dir=exports/demo_merged]

The PEFT directory holds adapter_config.json + adapter_model.safetensors (peft.PeftModel.from_pretrained
loads them on the base model), lit_config.json (how to use it as a LIT decoder) and
projection.safetensors; lit_jax.load_decoder loads either directory back (lit_jax/lit/export.py).
"""

from ml_collections import ConfigDict

from lit_jax.settings import ExportConfig, section


def get_config(arg: str | None = None) -> ConfigDict:
    c = ConfigDict()
    c.task = "export"
    c.seed = 0
    c.decoder = ""  # a `lit` run's work dir, or a directory an export wrote (merged or PEFT)
    c.decoder_step = -1  # the checkpoint step to export; -1: the latest
    c.target = ""  # other weights for the base (must be the model the decoder was trained on); "": as trained
    c.export = section(ExportConfig)  # peft_dir, hf_dir ("": not written), overwrite
    return c
