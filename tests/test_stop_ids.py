"""Stop ids come from every source: config.json, generation_config.json, the tokenizer's eos and
the chat template's end-of-turn token, for plain generation and for the Reader (issue 12, fault 1)."""

import copy
import json
import os
import shutil

import jax
import numpy as np
import pytest

from lit_jax.data import default_data_config
from lit_jax.data.decoder import template_end_of_turn_id
from lit_jax.generate import SamplingConfig, end_token_ids, generate
from lit_jax.hf import load_params, load_tokenizer, smollm2_gguf_path
from lit_jax.hf.convert import CheckpointError
from lit_jax.lit.config import LitConfig
from lit_jax.lit.read import Reader

PROMPT = [5, 17, 33, 9, 60]


@pytest.fixture(scope="module")
def base_tokenizer():
    """SmolLM2's tokenizer as base checkpoints ship it: eos <|endoftext|>, turns end with <|im_end|>."""
    tok = copy.deepcopy(load_tokenizer(smollm2_gguf_path()))
    tok.eos_token = "<|endoftext|>"
    return tok


def _ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_template_end_of_turn_is_probed(base_tokenizer):
    endoftext, im_end = _ids(base_tokenizer, "<|endoftext|>", "<|im_end|>")
    assert base_tokenizer.eos_token_id == endoftext != im_end
    assert template_end_of_turn_id(base_tokenizer) == im_end


def test_stop_ids_include_the_template_end_of_turn(tiny_checkpoint, base_tokenizer):
    endoftext, im_end = _ids(base_tokenizer, "<|endoftext|>", "<|im_end|>")
    cfg, _ = load_params(tiny_checkpoint("llama")[0])
    cfg = cfg.replace(eos_token_ids=(endoftext,))
    assert set(end_token_ids(cfg, base_tokenizer)) == {endoftext, im_end}
    assert set(end_token_ids(cfg, base_tokenizer, extra=(77,))) == {endoftext, im_end, 77}


def test_generation_stops_at_the_end_of_turn(tiny_checkpoint, base_tokenizer):
    endoftext, im_end = _ids(base_tokenizer, "<|endoftext|>", "<|im_end|>")
    cfg, params = load_params(tiny_checkpoint("llama")[0])
    cfg = cfg.replace(eos_token_ids=(endoftext,))  # config and tokenizer eos: <|endoftext|> only
    sampling = SamplingConfig(max_new_tokens=8)
    free = generate(jax.device_put(params), cfg, [PROMPT], sampling=sampling)[0]
    k = next(i for i in range(1, len(free)) if free[i] not in free[:i])  # a token first generated at step k > 0
    a = free[k]
    assert len(free) == 8 and not {a, im_end, endoftext} & set(free[:k] + PROMPT)
    # Permute the vocabulary (embedding rows and output columns) so the model emits <|im_end|> where it
    # emitted `a`: the same computation, relabeled.
    embed, head = np.array(params["embed"]), np.array(params["lm_head"])
    embed[[a, im_end]], head[:, [a, im_end]] = embed[[im_end, a]], head[:, [im_end, a]]
    emits_im_end = jax.device_put({**params, "embed": embed, "lm_head": head})
    relabeled = [{a: im_end, im_end: a}.get(t, t) for t in free]
    assert relabeled.index(im_end) == k and endoftext not in relabeled
    # Config and tokenizer eos only (<|endoftext|>): generation runs on past the end of the turn ...
    assert generate(emits_im_end, cfg, [PROMPT], sampling=sampling)[0] == relabeled
    # ... with the template's end-of-turn among the stop ids, it stops there.
    assert generate(emits_im_end, cfg, [PROMPT], sampling=sampling, tokenizer=base_tokenizer)[0] == relabeled[:k + 1]

def test_reader_stops_at_the_decoder_end_of_turn(tiny_checkpoint, base_tokenizer):
    endoftext, im_end = _ids(base_tokenizer, "<|endoftext|>", "<|im_end|>")
    cfg, _ = load_params(tiny_checkpoint("llama")[0])
    cfg = cfg.replace(eos_token_ids=(endoftext,))
    data_cfg = default_data_config()
    data_cfg.read_layers = (1,)
    reader = Reader(None, {}, cfg, LitConfig(read_layers=(1,)), base_tokenizer, data_cfg)
    assert reader.decoder_format.end_of_turn_id == im_end
    assert set(reader.eos_ids) == {endoftext, im_end}


@pytest.mark.parametrize("eos", [[2, 77], 77])
def test_generation_config_eos_ids_are_merged(tiny_checkpoint, tmp_path, eos):
    src = tiny_checkpoint("llama")[0]
    d = tmp_path / "model"
    shutil.copytree(src, d)
    with open(d / "generation_config.json") as f:
        gen = json.load(f)
    gen["eos_token_id"] = eos
    with open(d / "generation_config.json", "w") as f:
        json.dump(gen, f)
    cfg, _ = load_params(str(d))
    assert cfg.eos_token_ids == (2, 77)  # config.json's first, then generation_config.json's
    assert set(end_token_ids(cfg)) == {2, 77}


def test_bad_generation_config_is_refused(tiny_checkpoint, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(tiny_checkpoint("llama")[0], d)
    with open(d / "generation_config.json", "w") as f:
        json.dump({"eos_token_id": "</s>"}, f)
    with pytest.raises(CheckpointError, match="eos_token_id='</s>'"):
        load_params(str(d))
    os.remove(d / "generation_config.json")
    assert load_params(str(d))[0].eos_token_ids == (2,)
