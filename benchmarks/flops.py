"""Matmul FLOPs of one LIT training step, counted analytically (what each implementation executes).

Elementwise work (norms, softmax, rotary) is not counted: "FLOPs" here are the matmul
FLOPs that a matmul peak is the ceiling for.
"""

from __future__ import annotations

from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import projection_dims


def _per_token_layer(cfg: ModelConfig) -> int:
    """Multiply-adds of the projections of one block for one token."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    d, f = cfg.hidden_size, cfg.intermediate_size
    return d * (q + 2 * kv) + q * d + 3 * d * f


def _attention(cfg: ModelConfig, tokens: int, keys: int) -> int:
    """Multiply-adds of QK^T and PV for `tokens` queries over `keys` keys, all heads."""
    return 2 * tokens * keys * cfg.num_heads * cfg.head_dim


def _lora(cfg: ModelConfig, rank: int, targets) -> int:
    dims = projection_dims(cfg)
    return sum(rank * (dims[t][0] + dims[t][1]) for t in targets)


def lit_step_flops(cfg: ModelConfig, *, batch: int, read_len: int, dec_len: int, targets: int, read_layer: int,
                   rank: int, lora_targets, target_layers: int | None = None, logits_rows_target: int = 0,
                   logits_rows_decoder: int | None = None, lm_head_lora: bool = False,
                   attention_block: int = 0, attention_recompute: bool = False) -> dict[str, float]:
    """FLOPs (2 x multiply-adds) of: the target forward, the decoder forward and backward.

    target_layers: blocks the target runs (ours: read_layer + 1; a full forward: all).
    logits_rows_*: rows the vocabulary projection is computed for (ours: targets only).
    Backward: activation gradients only through frozen weights (same cost as the forward
    matmuls), attention backward 2x its forward (dQ, dK, dV, dP), LoRA backward 2x its forward.
    attention_recompute: the backward also recomputes the scores QK^T instead of saving the
    probabilities (ours, models/attention.py): attention backward 2.5x its forward.
    attention_block: query rows per block of blocked causal attention (ours: 64; 0 = dense):
    n blocks compute (n + 1) / (2n) of the dense scores.
    remat="matmuls" (and no remat) recompute no matmul in the backward, so "total" is what
    both execute.
    """
    n_target = read_layer + 1 if target_layers is None else target_layers
    bt_r, bt_d = batch * read_len, batch * dec_len
    layer, d, v = _per_token_layer(cfg), cfg.hidden_size, cfg.vocab_size
    lora = _lora(cfg, rank, lora_targets)
    rows_dec = batch * targets if logits_rows_decoder is None else logits_rows_decoder
    head_lora = rank * (d + v) if lm_head_lora else 0
    def attn(length: int) -> float:
        n = max(1, round(length / attention_block)) if attention_block else 1
        return _attention(cfg, batch * length, length) * (n + 1) / (2 * n)

    target = n_target * (bt_r * layer + attn(read_len)) + logits_rows_target * d * v
    layers_fwd = cfg.num_layers * (bt_d * (layer + lora) + attn(dec_len))
    dec_fwd = layers_fwd + rows_dec * (d * v + head_lora)
    attn_bwd = 2.5 if attention_recompute else 2.0
    dec_bwd = (cfg.num_layers * (bt_d * (layer + 2 * lora) + attn_bwd * attn(dec_len))
               + rows_dec * (d * v + 2 * head_lora))
    out = {"target": 2 * target, "decoder_fwd": 2 * dec_fwd, "decoder_bwd": 2 * dec_bwd}
    out["total"] = sum(out.values())
    return out


def lit_model_flops(cfg: ModelConfig, *, batch: int, read_len: int, dec_len: int, targets: int, read_layer: int,
                    rank: int, lora_targets) -> dict[str, float]:
    """Model FLOPs of one LIT step for MFU: the work the method needs, whatever a program executes.

    `batch` rows of `read_len` target tokens and `dec_len` decoder tokens, all real (no
    padding), `targets` answer tokens per row. Counted (2 x multiply-adds, as
    `lit_step_flops`): the target's forward through blocks 0..read_layer (no head); the
    decoder's forward through every block with LoRA, and its vocabulary projection at the
    answer positions only; its backward: activation gradients through the frozen weights
    (as many FLOPs as their forward: no weight gradients for a frozen base), LoRA's
    backward (2x its forward) and the attention backward (2x its forward: dQ, dK, dV, dP).
    Causal attention counts its lower triangle (each query with the keys up to and
    including itself). Not counted: recomputation (remat, a flash-attention backward's
    recomputed scores), work a layout adds (padding, a packed row's dense masked
    attention), elementwise work (norms, rotary, softmax) and the optimizer update.
    """
    # attention_block=1: blocks of one query row, i.e. exactly the causal triangle
    return lit_step_flops(cfg, batch=batch, read_len=read_len, dec_len=dec_len, targets=targets,
                          read_layer=read_layer, rank=rank, lora_targets=lora_targets, attention_block=1,
                          attention_recompute=False)
