"""Tokenizers: transformers' AutoTokenizer for HF directories; built from GGUF metadata otherwise.

transformers' own GGUF tokenizer path imports PyTorch, so for GGUF files we assemble the
byte-level BPE with `tokenizers` from the file's `tokenizer.ggml.*` fields and chat
template, and wrap it in `PreTrainedTokenizerFast` (same interface as AutoTokenizer).
"""

from __future__ import annotations

import os

import gguf
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from lit_jax.hf.gguf_in import field, open_gguf
from lit_jax.models.config import UnsupportedModelError

# llama.cpp `tokenizer.ggml.pre` -> how text is split before BPE.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r"}
_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED = 3, 4


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "qwen2"):
        regex = _QWEN2_SPLIT if pre == "qwen2" else _LLAMA3_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return byte_level


def tokenizer_from_gguf(path: str, reader: gguf.GGUFReader | None = None) -> PreTrainedTokenizerFast:
    reader = reader or open_gguf(path)
    kind = field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"{path}: GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only); "
            "load the HF directory instead"
        )
    tokens = field(reader, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in field(reader, "tokenizer.ggml.merges")]
    types = field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(field(reader, "tokenizer.ggml.pre"))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([
        AddedToken(t, special=True, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ])

    def token(key: str) -> str | None:
        i = field(reader, f"tokenizer.ggml.{key}_token_id")
        return None if i is None else tokens[int(i)]

    bos = token("bos")
    if field(reader, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        bos_id = tokens.index(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos"),
        unk_token=token("unknown"),
        pad_token=token("padding") or token("eos"),
        chat_template=field(reader, "tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )


def load_tokenizer(source: str) -> PreTrainedTokenizerBase:
    """Tokenizer for a GGUF file or an HF directory (local files only; no hub)."""
    if source.endswith(".gguf"):
        return tokenizer_from_gguf(source)
    if not os.path.isdir(source):
        raise FileNotFoundError(f"tokenizer directory {source!r} does not exist")
    from transformers import AutoTokenizer  # imported here: with torch installed it pulls torch in (~200 MB)

    tok = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
