"""Tasks: where prompts come from, how they are tokenized (with the question span), how completions are decoded
and which rewards grade them. `make_task(name, ...)` builds one:

- 'countdown': the repo's mini-Countdown (no files needed; the quick-start task);
- 'math:<dataset>' for gsm8k, math, math500, aime24, aime25, amc23, dapo_math_17k, deepscaler (files in
  manual_dir; the tokenizer's chat template + "put the final answer in \\boxed{}");
- 'code:humaneval' / 'code:mbpp' (sandboxed code rewards).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Optional, Sequence

from arm_jax.data.tokenizers import default_stop_ids
from arm_jax.rewards.registry import RewardSpec


@dataclasses.dataclass
class Task:
    """train/eval: random-access record sources; encode(record) -> (prompt ids, question mask); decode(ids) -> text;
    rewards: the reward terms; stop_ids: generation stops; sft_example(record, rng) -> (prompt ids, response ids)
    for a supervised warm start (None when the task has no reference solutions)."""

    name: str
    train: Any
    eval: Any
    encode: Callable[[dict], tuple[list[int], list[int]]]
    decode: Callable[[Sequence[int]], str]
    rewards: list[RewardSpec]
    stop_ids: list[int]
    sft_example: Optional[Callable[[dict, random.Random], tuple[list[int], list[int]]]] = None


def _countdown(task_seed: int = 1234, num_heldout: int = 200, format_weight: float = 0.0, **_) -> Task:
    """format_weight > 0 adds a shaping term for emitting a \\boxed{} (the verifier alone is the accuracy)."""
    from arm_jax.data import countdown as cd
    import arm_jax.rewards.countdown  # noqa: F401 - registers the 'countdown' reward

    def encode(rec):
        ids = cd.prompt_ids(rec["question"])
        return ids, [0] + [1] * (len(ids) - 1)  # c(q) over the question, not BOS

    train, heldout = cd.splits(task_seed, num_heldout)
    rewards = [RewardSpec("countdown", accuracy=True)]
    if format_weight:
        rewards.append(RewardSpec("format", format_weight, kwargs=(("pattern", "boxed"),)))
    return Task("countdown", train, heldout, encode, cd.decode, rewards, [cd.EOS_ID], cd.sft_example)


def _text_task(name: str, dataset: str, tokenizer, manual_dir: Optional[str], train_split: str, eval_split: str,
               eval_dataset: Optional[str], instruction: Optional[str], rewards: list[RewardSpec],
               data_dir: Optional[str]) -> Task:
    from arm_jax.data.builders import load_split
    from arm_jax.data.templates import build_prompt
    if tokenizer is None:
        raise ValueError(f"task {name!r} needs a tokenizer (a checkpoint folder with tokenizer files)")
    train = load_split(dataset, train_split, manual_dir, data_dir)
    ev = load_split(eval_dataset or dataset, eval_split, manual_dir, data_dir)

    def encode(rec):
        p = build_prompt(tokenizer, rec["question"], instruction=instruction)
        return p.ids, p.question_mask()

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    return Task(name, train, ev, encode, decode, rewards, default_stop_ids(tokenizer))


def make_task(name: str, tokenizer=None, manual_dir: Optional[str] = None, data_dir: Optional[str] = None,
              train_split: str = "train", eval_split: str = "test", eval_dataset: Optional[str] = None,
              **kwargs) -> Task:
    """A Task by name: 'countdown', 'math:<dataset>' or 'code:<dataset>' (files from manual_dir, tfds cache in
    data_dir)."""
    from arm_jax.data.templates import CODE_INSTRUCTION, MATH_INSTRUCTION
    if name == "countdown":
        return _countdown(**kwargs)
    kind, _, dataset = name.partition(":")
    if kind == "math":
        # DAPO-Math-17k prompts already carry their answer-format instruction
        instruction = None if dataset == "dapo_math_17k" else MATH_INSTRUCTION
        mode = "auto" if dataset == "gsm8k" else "boxed"
        fallback = "last_number" if dataset == "dapo_math_17k" else "none"  # DAPO asks for 'Answer: N'
        rewards = [RewardSpec("math", 1.0, accuracy=True, kwargs=(("mode", mode), ("fallback", fallback)))]
        return _text_task(name, dataset, tokenizer, manual_dir, train_split, eval_split, eval_dataset, instruction,
                          rewards, data_dir)
    if kind == "code":
        return _text_task(name, dataset, tokenizer, manual_dir, train_split, eval_split, eval_dataset,
                          CODE_INSTRUCTION, [RewardSpec("code", 1.0, accuracy=True)], data_dir)
    raise KeyError(f"unknown task {name!r}: use 'countdown', 'math:<dataset>' or 'code:<dataset>'")
