"""What the LIT computation does (hashable: a static argument of the jitted step)."""

from __future__ import annotations

import dataclasses

from lit_jax.models.lora import LoraConfig
from lit_jax.lit.residual_stream import WRITE_MODES

PROJECTIONS = ("identity", "linear", "mlp")
ABLATIONS = ("none", "zeros")


@dataclasses.dataclass(frozen=True)
class LitConfig:
    """read_layers: the target layer(s) read (several = sampled per example by the data pipeline).
    write_layer / write_mode: where and how activations enter the decoder.
    lora: decoder adapters; None = full fine-tune (the decoder keeps its own weights).
    ablate: "zeros" replaces every read activation by 0 (the control that shows the
        decoder uses the activations).
    """

    read_layers: tuple[int, ...] = (15,)
    write_layer: int = 0
    write_mode: str = "replace"
    projection: str = "identity"
    norm_match: bool = False
    mlp_hidden: int = 0  # 0: the model's hidden size
    lora: LoraConfig | None = LoraConfig()
    ablate: str = "none"

    def __post_init__(self):
        if not self.read_layers:
            raise ValueError("read_layers is empty")
        if self.write_mode not in WRITE_MODES:
            raise ValueError(f"write_mode={self.write_mode!r}; expected one of {WRITE_MODES}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection={self.projection!r}; expected one of {PROJECTIONS}")
        if self.ablate not in ABLATIONS:
            raise ValueError(f"ablate={self.ablate!r}; expected one of {ABLATIONS}")

    @property
    def full_finetune(self) -> bool:
        return self.lora is None
