"""Small tokenizers carrying each listed model family's official chat template.

The templates (tests/data/chat_templates/*.jinja, sources in its README) are the models' own,
verbatim. The tokenizers are small stand-ins that behave like the real ones where spans and
prompts depend on it:
- byte-level BPE (Llama 3.x, Qwen2/2.5/3): SmolLM2's vocabulary with the family's
  pre-tokenizer split and special tokens;
- SentencePiece-style BPE trained here on the LatentQA text: Llama 2 and Mistral v0.1/v0.2
  ("legacy": "▁" prepended to every piece between special tokens, [INST] plain text),
  Mistral v0.3 ("▁" prepended only at the start of the text, [INST]/[/INST] control tokens).
"""

from __future__ import annotations

import copy
import glob
import json
import os
from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

TEMPLATES = os.path.join(os.path.dirname(__file__), "chat_templates")


def template(name: str) -> str:
    with open(os.path.join(TEMPLATES, f"{name}.jinja"), encoding="utf-8") as f:
        return f.read()


class Family(NamedTuple):
    template: str  # file name in chat_templates/
    tokenizer: str  # "llama3", "qwen", "qwen3", "spm_legacy", "spm_v3", "smollm2"
    eot: str  # the token that ends an assistant turn
    user: str  # a user turn read with the generation header after it, "{x}" = content
    completion: str  # user turn + teacher-forced assistant turn, "{x}" user, "{y}" assistant
    first_user: str | None = None  # turn 0 read, when it differs from `user` (Llama 2: its BOS is not read)
    system_refused: str | None = None  # why a [system, user] read from turn 1 is refused


_L3 = "<|start_header_id|>{r}<|end_header_id|>\n\n"
_LLAMA3 = dict(tokenizer="llama3", eot="<|eot_id|>",
               user=_L3.format(r="user") + "{x}<|eot_id|>" + _L3.format(r="assistant"),
               completion=_L3.format(r="user") + "{x}<|eot_id|>" + _L3.format(r="assistant") + "{y}<|eot_id|>")
_CHATML = dict(eot="<|im_end|>", user="<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n",
               completion="<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n{y}<|im_end|>\n")
_MERGES_SYSTEM = "merges that turn into a later turn's block"

FAMILIES = {
    "llama2": Family("llama2", "spm_legacy", "</s>", "<s>[INST] {x} [/INST]", "<s>[INST] {x} [/INST] {y} </s>",
                     first_user="[INST] {x} [/INST]", system_refused=_MERGES_SYSTEM),
    "llama3": Family("llama3", **_LLAMA3),
    "llama3.1": Family("llama3.1", **_LLAMA3),  # 3.1 and 3.3 ship the same template
    "llama3.2": Family("llama3.2", **_LLAMA3),
    "llama3.3": Family("llama3.1", **_LLAMA3),
    "mistral_v0.2": Family("mistral_v0.2", "spm_legacy", "</s>", "[INST] {x} [/INST]", "[INST] {x} [/INST]{y}</s>",
                           system_refused="cannot render this dialog: Conversation roles must alternate"),
    "mistral_v0.3": Family("mistral_v0.3", "spm_v3", "</s>", "[INST] {x}[/INST]", "[INST] {x}[/INST] {y}</s>",
                           system_refused=_MERGES_SYSTEM),
    "qwen2": Family("qwen2", "qwen", **_CHATML),
    "qwen2.5": Family("qwen2.5", "qwen", **_CHATML),
    "qwen3": Family("qwen3", "qwen3", _CHATML["eot"], _CHATML["user"],
                    "<|im_start|>user\n{x}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n{y}<|im_end|>\n"),
    "smollm2": Family("", "smollm2", **_CHATML),
}

_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",
                 "<|fim_pad|>"]
_MISTRAL_V3_CONTROL = ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                       "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[control_8]", "[control_9]"]


def _corpus(data_dir: str) -> list[str]:
    """Every string in the LatentQA files, plus the templates' own words."""
    # the templates' own words, often enough to be merged as in the real vocabularies ("▁[", "INST", "▁?")
    out = ["[INST] <<SYS>> <</SYS>> [/INST] Layer: 15 Sure, I've analyzed the assistant. What is it? It is a test. "
           "Yes No 42 (b) a pirate ? ? ? ?"] * 200

    def walk(v):
        if isinstance(v, str):
            out.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    for path in sorted(glob.glob(os.path.join(data_dir, "latentqa", "**", "*.json"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            walk(json.load(f))
    return out


def _spm(data_dir: str, legacy: bool, control: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.train_from_iterator(_corpus(data_dir), trainers.BpeTrainer(
        vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    if legacy:  # Llama 2's tokenizer.json: no pre-tokenizer; "▁" prepended to each piece between special tokens
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
    else:  # Mistral v0.3's: Metaspace, "▁" prepended only where the text starts
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   clean_up_tokenization_spaces=False)


def _byte_level(smollm2_tok: Any, split: str, special: list[str], added: list[str], **tokens) -> PreTrainedTokenizerFast:
    backend = Tokenizer.from_str(smollm2_tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **tokens)


def build_tokenizers(smollm2_tok: Any, llama3_tok: Any, data_dir: str) -> dict[str, Any]:
    """Tokenizer kind -> tokenizer without a chat template (see `family_tokenizer`)."""
    from lit_jax.hf.tokenizer import _QWEN2_SPLIT

    qwen = dict(split=_QWEN2_SPLIT, special=_QWEN_SPECIAL, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    return {
        "smollm2": smollm2_tok, "llama3": llama3_tok,
        "qwen": _byte_level(smollm2_tok, added=[], **qwen),
        "qwen3": _byte_level(smollm2_tok, added=["<think>", "</think>"], **qwen),
        "spm_legacy": _spm(data_dir, True, []),
        "spm_v3": _spm(data_dir, False, _MISTRAL_V3_CONTROL),
    }


def family_tokenizer(tokenizers: dict[str, Any], name: str) -> Any:
    """A copy of the family's tokenizer with its official chat template (SmolLM2: its own, from the GGUF)."""
    fam = FAMILIES[name]
    tok = copy.deepcopy(tokenizers[fam.tokenizer])
    if fam.template:
        tok.chat_template = template(fam.template)
    return tok
