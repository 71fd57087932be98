"""benchmarks/gpu_train_step.py: its tiny mode runs on CPU end to end and prints positive figures;
the peak table refuses a device it does not know; the model FLOPs it divides by are the documented count."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks.flops import lit_model_flops
from benchmarks.gpu_train_step import TINY_HF_CONFIG, peak_flops
from lit_jax.models.config import from_hf_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "gpu_train_step.py")


def _run(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    # one CPU device, as on a GPU host (conftest.py fakes 8 for the sharding tests)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                                if not f.startswith("--xla_force_host_platform_device_count"))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def test_tiny_mode_prints_positive_figures():
    r = _run("--tiny", "--steps", "2", "--peak-tflops", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    for line in ("machine: ", "model: ", "LIT: read layer", "batch: ", "compile: ", "step: median", "tokens/s: ",
                 "model FLOPs/step: ", "MFU: ", "peak device memory after training: ", "reading: 32 reads"):
        assert line in out, f"{line!r} missing from:\n{out}"
    result = json.loads([x for x in out.splitlines() if x.startswith("RESULT ")][0][len("RESULT "):])
    assert result["tiny"] and result["device_kind"] == "cpu" and result["jax"]
    assert len(result["step_times_s"]) == 2 and result["step_s"] > 0
    assert result["tokens_per_s"] > 0 and result["decoder_tokens_per_s"] > 0
    assert result["model_flops"] > 0 and result["peak_flops"] == 0.5e12
    assert 0 < result["mfu"] == pytest.approx(result["model_flops"] / (result["step_s"] * 0.5e12))
    assert result["read_batch"] == 32 and result["new_tokens"] == 32 and result["questions_per_s"] > 0
    assert result["loss"] > 0  # a finite cross-entropy of a random model


def test_unknown_device_without_override_is_refused_before_any_work():
    r = _run("--tiny", timeout=300)  # CPU is not in the peak table
    assert r.returncode != 0
    assert "no peak bf16 FLOP/s known for device kind 'cpu'" in r.stderr and "--peak-tflops" in r.stderr
    assert "step: median" not in r.stdout


@pytest.mark.parametrize("kind,tflops", [
    ("NVIDIA H100 80GB HBM3", 989), ("NVIDIA H100 SXM5 80GB", 989), ("NVIDIA H100 PCIe", 756),
    ("NVIDIA H200", 989), ("NVIDIA A100-SXM4-80GB", 312), ("NVIDIA A100 80GB PCIe", 312),
])
def test_peak_table(kind, tflops):
    assert peak_flops(kind)[0] == tflops * 1e12


@pytest.mark.parametrize("kind", ["cpu", "TPU v5 lite", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "NVIDIA L4",
                                  "NVIDIA GeForce RTX 4090"])
def test_peak_table_refuses_unknown_devices(kind):
    with pytest.raises(ValueError, match="--peak-tflops"):
        peak_flops(kind)
    assert peak_flops(kind, 123.0) == (123e12, "--peak-tflops 123")  # the override works for any device
    with pytest.raises(ValueError, match="positive"):
        peak_flops(kind, 0.0)


def test_model_flops_are_the_documented_count():
    cfg = from_hf_dict(TINY_HF_CONFIG)
    B, R, T, P, L, r = 3, 20, 40, 7, 1, 16
    d, f, V, H, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads, cfg.head_dim
    q, kv = H * hd, cfg.num_kv_heads * hd
    layer = d * (q + 2 * kv) + q * d + 3 * d * f  # multiply-adds per token: q|k|v, o, gate|up|down
    lora = r * ((d + q) + 2 * (d + kv) + (q + d) + 2 * (d + f) + (f + d))
    attn = lambda n: 2 * B * n * (n + 1) // 2 * H * hd  # noqa: E731  QK^T and PV over the causal triangle
    target = (L + 1) * (B * R * layer + attn(R))  # blocks 0..L, no head
    fwd = cfg.num_layers * (B * T * (layer + lora) + attn(T)) + B * P * d * V
    bwd = cfg.num_layers * (B * T * (layer + 2 * lora) + 2 * attn(T)) + B * P * d * V
    got = lit_model_flops(cfg, batch=B, read_len=R, dec_len=T, targets=P, read_layer=L, rank=r,
                          lora_targets=("q", "k", "v", "o", "gate", "up", "down"))
    assert got["target"] == pytest.approx(2 * target)
    assert got["decoder_fwd"] == pytest.approx(2 * fwd)
    assert got["decoder_bwd"] == pytest.approx(2 * bwd)
    assert got["total"] == pytest.approx(2 * (target + fwd + bwd))
