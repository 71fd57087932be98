"""A LIT decoder as an HF PEFT LoRA adapter (+ lit_config.json) and back; PEFT adapters made by peft imported.

The base is a tiny random Llama (4 layers, hidden 64) over SmolLM2's tokenizer, exported as an HF
directory that both transformers and lit_jax load, in float32. PyTorch computes the decoder's
logits from the exported files alone (peft for the adapter, a forward hook for the write), and
must agree with lit_jax's decoder.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from ml_collections import ConfigDict
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.numpy import load_file
from safetensors.torch import save_file as save_torch
from transformers import AutoModelForCausalLM

from lit_jax import load_decoder
from lit_jax.data import Slots, chains, tokenize_read
from lit_jax.generate import SamplingConfig
from lit_jax.hf import export_hf, load_params, load_tokenizer
from lit_jax.hf.peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, PeftAdapterError, tensor_name
from lit_jax.hf.smollm2 import resolve_model_path
from lit_jax.lit.config import LitConfig
from lit_jax.lit.job import data_meta
from lit_jax.lit.loss import decoder_weights, written_vectors
from lit_jax.lit.peft_decoder import (LIT_CONFIG_FILE, FullFinetuneExportError, export_peft, import_peft_adapter)
from lit_jax.lit.residual_stream import ResidualWrite, write_edit
from lit_jax.lit.train_state import init_trainable
from lit_jax.lit.trained import DecoderMismatchError, TrainedDecoder
from lit_jax.models import llama
from lit_jax.models.config import ModelConfig
from lit_jax.models.lora import LoraConfig, LoraWeights
from lit_jax.settings import lit_section_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
DIALOG = [{"role": "system", "content": "You are a pirate who loves the sea."},
          {"role": "user", "content": "Hi there, how are you?"}]
QUESTION = "What persona will the assistant adopt?"
READ_LAYER = 2


def _config_module(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, ROOT)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path("smollm2"))


def _random_base(tok, out, hidden=64, seed=0):
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=len(tok), hidden_size=hidden,
                      intermediate_size=2 * hidden, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
                      tie_embeddings=True, eos_token_ids=(int(tok.eos_token_id),), pad_token_id=tok.pad_token_id)
    params = jax.device_get(llama.init_params(jax.random.key(seed), cfg, std=0.1))
    return export_hf(params, cfg, str(out), tokenizer=tok)


@pytest.fixture(scope="module")
def base_dir(tokenizer, tmp_path_factory):
    return _random_base(tokenizer, tmp_path_factory.mktemp("base") / "hf")


def _decoder(base_dir, write_mode="replace", write_layer=1, projection="linear", norm_match=True, seed=1):
    """A decoder as a `lit` run would hold it: random non-zero LoRA B and projection."""
    cfg, base = load_params(base_dir)
    tok = load_tokenizer(base_dir)
    lcfg = LitConfig(read_layers=(READ_LAYER,), write_layer=write_layer, write_mode=write_mode, projection=projection,
                     norm_match=norm_match, lora=LoraConfig(rank=4, alpha=8.0))
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    trainable = jax.device_get(init_trainable(k1, cfg, lcfg))
    for i, (name, p) in enumerate(sorted(trainable["lora"].items())):
        p["b"] = np.asarray(jax.random.normal(jax.random.fold_in(k2, i), p["b"].shape) * 0.1)
    if projection == "linear":
        d = cfg.hidden_size
        trainable["proj"]["w"] = np.eye(d, dtype=np.float32) + 0.1 * np.asarray(jax.random.normal(k3, (d, d)))
        trainable["proj"]["b"] = np.full((d,), 0.01, np.float32)
    config = _config_module("tiny").get_config()
    config.model.source = str(base_dir)
    config.data.read_layers = (READ_LAYER,)
    config.lit = lit_section_of(lcfg)
    return TrainedDecoder(cfg, lcfg, base, trainable, tok, config.data, 7, "in-memory", config)


@pytest.fixture(scope="module")
def decoder(base_dir):
    return _decoder(base_dir)


@pytest.fixture(scope="module")
def peft_dir(decoder, tmp_path_factory):
    return export_peft(decoder, str(tmp_path_factory.mktemp("peft") / "adapter"))


def _lit_logits(decoder, read, question):
    """lit_jax's decoder logits [T, V] on the generation prompt with the read's activations written."""
    cfg, lcfg = decoder.cfg, decoder.lcfg
    tokens, positions = read
    prompt = decoder.reader().decoder_format.prompt(len(positions), question, READ_LAYER)
    slots = Slots(positions[None], np.full((1, len(positions)), READ_LAYER, np.int32), prompt.write_positions[None],
                  np.ones((1, len(positions)), bool))
    vectors = written_vectors(decoder.trainable, decoder.base, chains(tokens[None], np.ones((1, len(tokens)), bool)),
                              slots, cfg, lcfg)
    params, lora = decoder_weights(decoder.trainable, decoder.base, cfg, lcfg)
    edit = write_edit(ResidualWrite(vectors, slots.write_positions, slots.mask), lcfg.write_layer, lcfg.write_mode)
    logits = llama.forward(params, jnp.asarray([prompt.tokens]), cfg, lora=lora, edit=edit).logits[0]
    return np.asarray(logits), np.asarray(vectors[0]), prompt


def _write_hook(vectors, positions, mode):
    """A forward hook on a transformers decoder layer: the LIT write on its output (the residual stream)."""
    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        h = h.clone()
        v = torch.as_tensor(np.asarray(vectors), dtype=h.dtype)
        idx = torch.as_tensor(np.asarray(positions), dtype=torch.long)
        if mode == "replace":
            h[0, idx] = v
        else:  # add_norm_matched: h + ||h|| * v / ||v||
            cur = h[0, idx]
            h[0, idx] = cur + cur.norm(dim=-1, keepdim=True) * v / v.norm(dim=-1, keepdim=True)
        return (h, *output[1:]) if isinstance(output, tuple) else h
    return hook


def _torch_project(proj, kind, norm_match, x):
    """lit_config.json's projection, in PyTorch, from projection.safetensors."""
    if kind == "identity":
        y = x
    elif kind == "linear":
        y = x @ proj["w"] + proj["b"]
    else:
        y = x + torch.nn.functional.gelu(x @ proj["w1"] + proj["b1"], approximate="tanh") @ proj["w2"] + proj["b2"]
    if norm_match:
        y = y * (x.norm(dim=-1, keepdim=True) / y.norm(dim=-1, keepdim=True))
    return y


def test_peft_adapter_naming_is_what_peft_saves(base_dir, tmp_path):
    """The names and config fields we write are those peft itself writes for a LoRA on this model."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, PeftLoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], lora_dropout=0.0))
    peft_model.save_pretrained(str(tmp_path / "by_peft"))
    from safetensors import safe_open

    with safe_open(str(tmp_path / "by_peft" / ADAPTER_WEIGHTS), "numpy") as f:
        theirs = {k: f.get_tensor(k).shape for k in f.keys()}
    ours = {tensor_name(i, t, w) for i in range(4) for t in ("q", "k", "v", "o", "gate", "up", "down") for w in "AB"}
    assert set(theirs) == ours
    assert theirs[tensor_name(0, "down", "A")] == (4, 128) and theirs[tensor_name(0, "k", "B")] == (32, 4)


@pytest.mark.parametrize("write_mode", ["replace", "add_norm_matched"])
def test_pytorch_peft_decoder_equals_lit_jax(base_dir, tmp_path, write_mode):
    """transformers + peft on the exported files, activations read, projected and written in PyTorch
    as lit_config.json says, give lit_jax's decoder logits."""
    decoder = _decoder(base_dir, write_mode=write_mode, write_layer=1)
    out = export_peft(decoder, str(tmp_path / "adapter"))
    assert sorted(os.listdir(out)) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, LIT_CONFIG_FILE,
                                              "projection.safetensors"])
    lc = json.load(open(os.path.join(out, LIT_CONFIG_FILE)))
    assert (lc["read_layers"], lc["write_layer"], lc["write_mode"]) == ([READ_LAYER], 1, write_mode)
    assert lc["projection"] == {"kind": "linear", "norm_match": True, "mlp_hidden": 0, "file": "projection.safetensors"}
    assert lc["base_model"]["name_or_path"] == os.path.abspath(base_dir) and lc["step"] == 7
    assert lc["placeholder_token_id"] == decoder.tokenizer.convert_tokens_to_ids(lc["placeholder_token"])
    conf = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
    assert conf["r"] == 4 and conf["lora_alpha"] == 8 and conf["base_model_name_or_path"] == os.path.abspath(base_dir)

    read = tokenize_read(decoder.tokenizer, DIALOG, read_from_turn=1)
    ours, vectors, prompt = _lit_logits(decoder, read, QUESTION)

    model = AutoModelForCausalLM.from_pretrained(conf["base_model_name_or_path"], dtype=torch.float32,
                                                 attn_implementation="eager")
    model = PeftModel.from_pretrained(model, out).eval()
    proj = {k: torch.as_tensor(v) for k, v in load_file(os.path.join(out, lc["projection"]["file"])).items()}
    with torch.no_grad():
        with model.disable_adapter():  # the target is the base model
            hidden = model(torch.as_tensor(read[0][None], dtype=torch.long),
                           output_hidden_states=True).hidden_states[lc["read_layers"][0] + 1]
        acts = hidden[0, torch.as_tensor(read[1], dtype=torch.long)]
        written = _torch_project(proj, lc["projection"]["kind"], lc["projection"]["norm_match"], acts)
        np.testing.assert_allclose(written.numpy(), vectors, atol=1e-4, rtol=1e-4)
        layer = model.base_model.model.model.layers[lc["write_layer"]]
        handle = layer.register_forward_hook(_write_hook(written.numpy(), prompt.write_positions, lc["write_mode"]))
        try:
            theirs = model(torch.as_tensor(np.asarray(prompt.tokens)[None], dtype=torch.long)).logits[0].numpy()
        finally:
            handle.remove()
        without = model(torch.as_tensor(np.asarray(prompt.tokens)[None], dtype=torch.long)).logits[0].numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    assert np.abs(without - ours).max() > 1e-2  # the write matters
    with torch.no_grad(), model.disable_adapter():
        plain = model(torch.as_tensor(np.asarray(prompt.tokens)[None], dtype=torch.long)).logits[0].numpy()
    assert np.abs(plain - without).max() > 1e-2  # and so does the adapter


def test_round_trip_gives_identical_answers(decoder, peft_dir):
    loaded = load_decoder(peft_dir)
    assert loaded.lcfg == decoder.lcfg and loaded.step == 7 and loaded.cfg == decoder.cfg
    for t in decoder.lcfg.lora.targets:
        np.testing.assert_array_equal(np.asarray(loaded.trainable["lora"][t]["b"]), decoder.trainable["lora"][t]["b"])
    np.testing.assert_array_equal(np.asarray(loaded.trainable["proj"]["w"]), decoder.trainable["proj"]["w"])
    for key in ("prompt_style", "acknowledgement", "read_layers", "read_all_layers", "max_decoder_tokens"):
        assert loaded.data_cfg[key] == decoder.data_cfg[key], key
    assert data_meta(loaded.data_cfg, loaded.tokenizer) == data_meta(decoder.data_cfg, decoder.tokenizer)
    reads = [tokenize_read(decoder.tokenizer, DIALOG, read_from_turn=1),
             tokenize_read(decoder.tokenizer, "The capital of Japan is Tokyo.")]
    questions = [QUESTION, "What is the topic?"]
    sampling = SamplingConfig(max_new_tokens=8)
    assert loaded.reader(sampling).ask_tokens(reads, questions) == decoder.reader(sampling).ask_tokens(reads, questions)
    cands = [["A pirate.", "An accountant."], ["Geography", "Yes"]]
    for a, b in zip(loaded.reader().score(reads, questions, cands), decoder.reader().score(reads, questions, cands)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    assert loaded.step == 7 and load_decoder(peft_dir, step=7).step == 7
    with pytest.raises(ValueError, match="holds step 7 only"):
        load_decoder(peft_dir, step=3)


@pytest.mark.parametrize("setup", ["all_targets", "subset_of_layers"])
def test_import_adapter_made_by_peft(base_dir, tmp_path, setup):
    """peft's own adapter (random A and B) as a LIT decoder: lit_jax's logits, with a write after
    block 0, equal peft's with the same write by a hook."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    if setup == "all_targets":
        conf = PeftLoraConfig(r=4, lora_alpha=16, target_modules="all-linear", lora_dropout=0.1)
    else:
        conf = PeftLoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "down_proj"],
                              layers_to_transform=[1, 3], layers_pattern="layers")
    model = get_peft_model(model, conf)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(tmp_path / "adapter"))
    model.eval()

    dec = import_peft_adapter(str(tmp_path / "adapter"), base=base_dir, read_layers=(READ_LAYER,), write_layer=0)
    want = ("q", "k", "v", "o", "gate", "up", "down") if setup == "all_targets" else ("q", "v", "down")
    assert dec.lcfg.lora.targets == want and dec.lcfg.lora.scale == (4.0 if setup == "all_targets" else 2.5)
    if setup == "subset_of_layers":
        assert not np.asarray(dec.trainable["lora"]["q"]["b"][0]).any()
        assert np.asarray(dec.trainable["lora"]["q"]["b"][1]).any()

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, dec.cfg.vocab_size, size=(1, 12))
    positions = np.asarray([[3, 4, 5]])
    vectors = rng.normal(size=(1, 3, dec.cfg.hidden_size)).astype(np.float32)
    edit = write_edit(ResidualWrite(jnp.asarray(vectors), jnp.asarray(positions), jnp.ones((1, 3), bool)), 0,
                      "replace")
    ours = llama.forward(dec.base, jnp.asarray(tokens), dec.cfg, lora=LoraWeights(dec.trainable["lora"],
                                                                                  dec.lcfg.lora.scale), edit=edit)
    layer = model.base_model.model.model.layers[0]
    handle = layer.register_forward_hook(_write_hook(vectors[0], positions[0], "replace"))
    with torch.no_grad():
        theirs = model(torch.as_tensor(tokens)).logits[0].numpy()
    handle.remove()
    np.testing.assert_allclose(np.asarray(ours.logits[0]), theirs, atol=1e-4, rtol=0)

    # an imported adapter exports as ours (lit_config.json with the settings given) and loads back
    again = load_decoder(export_peft(dec, str(tmp_path / "again")))
    assert again.lcfg == dec.lcfg and again.config.model.source == base_dir
    read = tokenize_read(dec.tokenizer, DIALOG, read_from_turn=1)
    np.testing.assert_allclose(again.reader().score([read], [QUESTION], [["Yes"]])[0],
                               dec.reader().score([read], [QUESTION], [["Yes"]])[0], rtol=1e-6)


def test_existing_directory_is_kept_unless_overwrite(decoder, tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"not empty; pass overwrite=True"):
        export_peft(decoder, str(target))
    assert os.listdir(target) == ["keep.txt"] and (target / "keep.txt").read_text() == "mine"
    export_peft(decoder, str(target), overwrite=True)
    assert LIT_CONFIG_FILE in os.listdir(target) and "keep.txt" not in os.listdir(target)
    empty = tmp_path / "empty"
    empty.mkdir()
    export_peft(decoder, str(empty))  # an empty directory may be written into
    assert ADAPTER_WEIGHTS in os.listdir(empty)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "empty"]  # no temporary directories left


def test_full_finetune_decoder_is_refused(decoder, tmp_path):
    full = decoder._replace(lcfg=dataclasses.replace(decoder.lcfg, lora=None),
                            trainable={"proj": decoder.trainable["proj"], "decoder": decoder.base})
    with pytest.raises(FullFinetuneExportError, match="export the merged model instead"):
        export_peft(full, str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("change, message", [
    ({"use_rslora": True}, "use_rslora=True"),
    ({"use_dora": True}, "use_dora=True"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 3}}, "alpha_pattern"),
    ({"bias": "lora_only"}, "bias='lora_only'"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out=True"),
    ({"target_modules": ["q_proj", "lm_head"]}, r"target_modules \['lm_head'\]"),
    ({"init_lora_weights": "pissa"}, "changed the base model's weights"),
    ({"peft_type": "IA3"}, "peft_type='IA3'"),
    ({"task_type": "SEQ_CLS"}, "task_type='SEQ_CLS'"),
    ({"some_future_option": 2}, "some_future_option=2 is unknown"),
])
def test_unrepresentable_adapter_config_is_refused(peft_dir, base_dir, tmp_path, change, message):
    bad = shutil.copytree(peft_dir, tmp_path / "bad")
    os.remove(bad / LIT_CONFIG_FILE)
    conf = json.load(open(bad / ADAPTER_CONFIG))
    json.dump({**conf, **change}, open(bad / ADAPTER_CONFIG, "w"))
    with pytest.raises(PeftAdapterError, match=message):
        import_peft_adapter(str(bad), base=base_dir)


def test_unrepresentable_or_mismatched_weights_are_refused(peft_dir, base_dir, tokenizer, tmp_path):
    # a tensor of a module lit_jax does not adapt
    extra = shutil.copytree(peft_dir, tmp_path / "extra")
    tensors = {k: torch.as_tensor(v) for k, v in load_file(str(extra / ADAPTER_WEIGHTS)).items()}
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    save_torch(tensors, str(extra / ADAPTER_WEIGHTS))
    with pytest.raises(PeftAdapterError, match="lm_head.lora_A.weight' is not a LoRA A/B matrix"):
        import_peft_adapter(str(extra), base=base_dir)
    # pickled weights only: refused, never opened
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(os.path.join(peft_dir, ADAPTER_CONFIG), pickled / ADAPTER_CONFIG)
    (pickled / "adapter_model.bin").write_bytes(b"not opened")
    with pytest.raises(PeftAdapterError, match=r"only pickled weights \(adapter_model.bin\)"):
        import_peft_adapter(str(pickled), base=base_dir)
    # another base model: shapes do not fit
    small = _random_base(tokenizer, tmp_path / "small", hidden=32)
    with pytest.raises(PeftAdapterError, match=r"has shape \[4, 64\]; the base model .* needs \[4, 32\]"):
        import_peft_adapter(peft_dir, base=small)
    # load_decoder: the target must be the model the decoder was trained on
    with pytest.raises(DecoderMismatchError, match="hidden_size: trained with 64, target has 32"):
        load_decoder(peft_dir, target=small)
    # an adapter without lit_config.json is not guessed at
    foreign = shutil.copytree(peft_dir, tmp_path / "foreign")
    os.remove(foreign / LIT_CONFIG_FILE)
    with pytest.raises(FileNotFoundError, match="import_peft_adapter"):
        load_decoder(str(foreign))


def _main(*args):
    return subprocess.run([sys.executable, "-m", "lit_jax.main", "--config=configs/export.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900, env=ENV)


def test_export_task_end_to_end(decoder, peft_dir, tmp_path):
    peft_out, hf_out = tmp_path / "peft", tmp_path / "merged"
    r = _main(f"--config.decoder={peft_dir}", f"--config.export.peft_dir={peft_out}",
              f"--config.export.hf_dir={hf_out}")
    assert r.returncode == 0, r.stderr[-4000:]
    assert f"PEFT adapter written to {peft_out}" in r.stdout and "PeftModel.from_pretrained" in r.stdout
    assert f"merged decoder written to {hf_out}" in r.stdout
    read = tokenize_read(decoder.tokenizer, DIALOG, read_from_turn=1)
    cands = [["A pirate.", "Yes"]]
    want = decoder.reader().score([read], [QUESTION], cands)[0]
    np.testing.assert_allclose(load_decoder(str(peft_out)).reader().score([read], [QUESTION], cands)[0], want,
                               rtol=1e-6)
    merged = load_decoder(str(hf_out))
    assert merged.lcfg.lora is None and merged.step == 7
    np.testing.assert_allclose(merged.reader().score([read], [QUESTION], cands)[0], want, rtol=1e-4)

    r = _main(f"--config.decoder={peft_dir}", f"--config.export.peft_dir={peft_out}")
    assert r.returncode != 0 and "--config.export.overwrite=True" in r.stderr
    r = _main(f"--config.decoder={peft_dir}")
    assert r.returncode != 0 and "--config.export.peft_dir and/or --config.export.hf_dir" in r.stderr
