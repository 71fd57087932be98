"""Fixtures for the data pipeline tests: the real SmolLM2 tokenizer (ChatML), a Llama-3-style
tokenizer (same BPE, Llama-3 special tokens and chat template), and the LatentQA corpus prepared once."""

import pytest
from tokenizers import AddedToken, Regex, Tokenizer, pre_tokenizers
from transformers import PreTrainedTokenizerFast

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
    " + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<|reserved_special_token_0|>"]


@pytest.fixture(scope="session")
def smollm2_tok():
    from lit_jax.hf import load_tokenizer, smollm2_gguf_path

    return load_tokenizer(smollm2_gguf_path())


@pytest.fixture(scope="session")
def llama3_tok(smollm2_tok):
    """SmolLM2's byte-level BPE vocabulary with Llama-3's pre-tokenizer split, special tokens and chat
    template (BOS from the template)."""
    from lit_jax.hf.tokenizer import _LLAMA3_SPLIT

    backend = Tokenizer.from_str(smollm2_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIAL])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|end_of_text|>", chat_template=LLAMA3_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


def memory_config(**overrides):
    from lit_jax.data import default_data_config

    cfg = default_data_config()
    cfg.storage = "memory"
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


@pytest.fixture(scope="session")
def latentqa_prepared(smollm2_tok):
    """The full LatentQA corpus (eval + v0, default settings), tokenized with SmolLM2: (examples, meta, cfg)."""
    from lit_jax.data import prepare_examples

    cfg = memory_config()
    examples, meta = prepare_examples(cfg, smollm2_tok)
    return examples, meta, cfg
