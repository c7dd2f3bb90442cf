"""Mini-Countdown: the repo's own verifiable task for the CPU quick-start (recipe and ablations: experiments/README.md).

Prompt: three numbers in 1..9 and a target, e.g. `3,8,5|19|`. Response: a left-to-right chain of two steps, the
boxed expression, EOS: `8*3=24,24-5=19\\boxed{(8*3)-5}`. Operators + - *, intermediates >= 0. Any valid expression
using each number once counts (the verifier is `arm_jax.rewards.countdown`), so most prompts have several correct
answers and diversity among them is measurable. The 2,068 (multiset, target) prompts are split by a fixed task
seed into 200 held-out keys and the rest for training.

Tokens are characters (`\\boxed{` is one token): a 23-token vocabulary saved as a real tokenizer folder
(tokenizers WordLevel + a character splitter), so the quick-start exercises the HF loading path.
"""

from __future__ import annotations

import itertools
import json
import os
import random

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
BOXED = "\\boxed{"
VOCAB = [PAD, BOS, EOS] + list("0123456789") + list("+-*=,|()") + [BOXED, "}"]
TOKEN_ID = {t: i for i, t in enumerate(VOCAB)}
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
MAX_PROMPT_TOKENS = 11  # BOS + '9,9,9|729|'
MAX_RESPONSE_TOKENS = 26  # '9*9=81,81*9=729' + \boxed{ + '(9*9)*9' + '}' + EOS = 25, plus one spare


def all_prompts() -> dict[tuple[tuple[int, int, int], int], list[str]]:
    """(sorted numbers, target) -> the list of valid two-step chains 'a*b=x,x-c=t\\boxed{(a*b)-c}'."""
    out: dict = {}
    for ms in itertools.combinations_with_replacement(range(1, 10), 3):
        for a, b, c in sorted(set(itertools.permutations(ms))):
            for o1, f1 in OPS.items():
                x = f1(a, b)
                if x < 0:
                    continue
                for o2, f2 in OPS.items():
                    t = f2(x, c)
                    if t < 0:
                        continue
                    chain = f"{a}{o1}{b}={x},{x}{o2}{c}={t}{BOXED}({a}{o1}{b}){o2}{c}}}"
                    out.setdefault((ms, t), []).append(chain)
    return out


def splits(task_seed: int = 1234, num_heldout: int = 200) -> tuple[list[dict], list[dict]]:
    """(train, heldout) records: id, question (the prompt text, numbers in a seeded random order), answer
    (the target), numbers (JSON), solutions (JSON list of chains)."""
    table = all_prompts()
    keys = sorted(table)
    rng = random.Random(task_seed)
    heldout = set(rng.sample(range(len(keys)), num_heldout))
    train, test = [], []
    for i, key in enumerate(keys):
        nums, target = key
        order = list(nums)
        random.Random(task_seed * 7919 + i).shuffle(order)
        rec = {"id": str(i), "question": f"{','.join(map(str, order))}|{target}|", "answer": str(target),
               "numbers": json.dumps(sorted(nums)), "solutions": json.dumps(table[key])}
        (test if i in heldout else train).append(rec)
    return train, test


def encode(text: str) -> list[int]:
    """Character tokenization (with `\\boxed{` as one token); raises on a character outside the vocabulary."""
    ids, i = [], 0
    while i < len(text):
        if text.startswith(BOXED, i):
            ids.append(TOKEN_ID[BOXED])
            i += len(BOXED)
        else:
            if text[i] not in TOKEN_ID:
                raise ValueError(f"character {text[i]!r} is not in the countdown vocabulary")
            ids.append(TOKEN_ID[text[i]])
            i += 1
    return ids


def prompt_ids(question: str) -> list[int]:
    """The token ids of a countdown question, BOS first."""
    return [BOS_ID] + encode(question)


def sft_example(record: dict, rng: random.Random) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids + EOS) with one of the valid chains chosen uniformly."""
    chain = rng.choice(json.loads(record["solutions"]))
    return prompt_ids(record["question"]), encode(chain) + [EOS_ID]


def save_tokenizer(folder: str) -> None:
    """Writes a transformers tokenizer folder (tokenizer.json + tokenizer_config.json) for the 23-token vocab."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    os.makedirs(folder, exist_ok=True)
    fast.save_pretrained(folder)
    cfg_path = os.path.join(folder, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"  # not the model family's tokenizer class
    json.dump(cfg, open(cfg_path, "w"), indent=2)


def decode(ids, stop_at_eos: bool = True) -> str:
    """Token ids -> text: stops at EOS (when stop_at_eos), drops PAD / BOS / EOS and out-of-vocabulary ids."""
    out = []
    for i in ids:
        i = int(i)
        if i == EOS_ID and stop_at_eos:
            break
        if i >= len(VOCAB) or i in (PAD_ID, BOS_ID, EOS_ID):
            continue
        out.append(VOCAB[i])
    return "".join(out)


def tiny_model_config(hidden: int = 64, layers: int = 2, heads: int = 4, mlp: int = 256, dtype: str = "float32",
                      tie: bool = True, act: str = "silu", arch: str = "qwen2"):
    """The quick-start model over the 23-token vocabulary (~100 k parameters): arch 'qwen2' (RMSNorm, gated MLP,
    q/k/v biases) or 'starcoder2' (LayerNorm, plain MLP, biases everywhere); both RoPE. act: the MLP activation
    (HF `hidden_act`)."""
    from arm_jax.config import ModelConfig, RopeConfig
    if arch not in ("qwen2", "starcoder2"):
        raise ValueError(f"tiny model arch must be 'qwen2' or 'starcoder2', got {arch!r}")
    family = {} if arch == "qwen2" else dict(norm_type="layer", mlp_type="plain", o_bias=True, mlp_bias=True,
                                             rms_norm_eps=1e-5)
    return ModelConfig(model_type=arch, vocab_size=len(VOCAB), hidden_size=hidden, intermediate_size=mlp,
                       num_layers=layers, num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                       tie_word_embeddings=tie, hidden_act=act, rope=RopeConfig(theta=10000.0),
                       max_position_embeddings=64, dtype=dtype, bos_token_id=BOS_ID, eos_token_ids=(EOS_ID,),
                       pad_token_id=PAD_ID, **family)
