"""Tasks: where prompts come from, how they are tokenized (with the question span), how completions are decoded
and which rewards grade them. `make_task(name, ...)` builds one:

- 'countdown': the repo's mini-Countdown (no files needed; the quick-start task);
- 'math:<dataset>' for gsm8k, math, math500, aime24, aime25, amc23, dapo_math_17k, deepscaler (files in
  manual_dir);
- 'code:humaneval' / 'code:mbpp' (sandboxed code rewards).

Each split is asked and graded in its own dataset's format (`arm_jax.data.templates.dataset_format`): under
'math:dapo_math_17k' the training prompts are DAPO's (`Answer:` line, graded by the 'dapo' rule) while a MATH-500
held-out split gets the boxed instruction and boxed grading, exactly as `python -m arm_jax.eval` asks it
(`split_encoder` and `split_rewards` serve both).
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Optional, Sequence

from arm_jax.data.templates import PromptFormat, build_prompt, dataset_format
from arm_jax.data.tokenizers import default_stop_ids
from arm_jax.rewards.registry import RewardSpec


@dataclasses.dataclass
class Task:
    """train/eval: random-access record sources; encode(record) -> (prompt ids, question mask) and rewards: the
    training split's prompts and reward terms; eval_encode / eval_rewards: the held-out split's (default: the
    training split's); decode(ids) -> text; stop_ids: generation stops; sft_example(record, rng) -> (prompt ids,
    response ids) for a supervised warm start (None when the task has no reference solutions)."""

    name: str
    train: Any
    eval: Any
    encode: Callable[[dict], tuple[list[int], list[int]]]
    decode: Callable[[Sequence[int]], str]
    rewards: list[RewardSpec]
    stop_ids: list[int]
    sft_example: Optional[Callable[[dict, random.Random], tuple[list[int], list[int]]]] = None
    eval_encode: Optional[Callable[[dict], tuple[list[int], list[int]]]] = None
    eval_rewards: Optional[list[RewardSpec]] = None

    def __post_init__(self):
        self.eval_encode = self.eval_encode or self.encode
        self.eval_rewards = self.eval_rewards if self.eval_rewards is not None else self.rewards


def _countdown(task_seed: int = 1234, num_heldout: int = 200, format_weight: float = 0.0,
               stop_ids: Sequence[int] = ()) -> Task:
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
    stops = sorted({cd.EOS_ID} | {int(i) for i in stop_ids})
    return Task("countdown", train, heldout, encode, cd.decode, rewards, stops, cd.sft_example)


def split_encoder(tokenizer, fmt: PromptFormat) -> Callable[[dict], tuple[list[int], list[int]]]:
    """record -> (prompt ids, question mask): the chat template around fmt.prefix + question + fmt.suffix, the
    question tokens marked (c(q) averages them, not the instruction)."""
    def encode(rec):
        p = build_prompt(tokenizer, rec["question"], fmt=fmt)
        return p.ids, p.question_mask()
    return encode


def split_rewards(fmt: PromptFormat, reward_workers: int = 2, allow_unsandboxed: bool = False) -> list[RewardSpec]:
    """The verifier of a split asked in `fmt`: the sandboxed code reward (allow_unsandboxed: run model-written code
    without isolation where none is available, instead of an error), or math-verify on fmt's answer format with
    `reward_workers` grading processes."""
    if fmt.answer_format is None:
        return [RewardSpec("code", 1.0, accuracy=True, kwargs=(("allow_unsandboxed", True),) if allow_unsandboxed
                           else ())]
    return [RewardSpec("math", 1.0, accuracy=True,
                       kwargs=(("answer_format", fmt.answer_format), ("workers", reward_workers)))]


def make_task(name: str, tokenizer=None, manual_dir: Optional[str] = None, data_dir: Optional[str] = None,
              train_split: str = "train", eval_split: str = "test", eval_dataset: Optional[str] = None,
              stop_ids: Sequence[int] = (), reward_workers: int = 2, allow_unsandboxed: bool = False,
              **kwargs) -> Task:
    """A Task by name: 'countdown', 'math:<dataset>' or 'code:<dataset>' (files from manual_dir, tfds cache in
    data_dir). eval_dataset: the held-out source (default the training dataset's eval_split), asked and graded
    in its own format; stop_ids: extra stop ids (the checkpoint's eos ids, `Policy.eos_token_ids`);
    reward_workers: math grading processes; allow_unsandboxed (code tasks): run model-written code unisolated
    where the sandbox cannot isolate it (logged; otherwise an error before the first step)."""
    if name == "countdown":
        return _countdown(stop_ids=stop_ids, **kwargs)
    kind, _, dataset = name.partition(":")
    if kind not in ("math", "code"):
        raise KeyError(f"unknown task {name!r}: use 'countdown', 'math:<dataset>' or 'code:<dataset>'")
    if kwargs:
        raise TypeError(f"task {name!r} got unknown options {sorted(kwargs)} (experiment.task_kwargs)")
    if tokenizer is None:
        raise ValueError(f"task {name!r} needs a tokenizer (a checkpoint folder with tokenizer files)")
    from arm_jax.data.builders import load_split
    eval_dataset = eval_dataset or dataset
    train_fmt, eval_fmt = dataset_format(dataset), dataset_format(eval_dataset)
    if (train_fmt.answer_format is None) != (kind == "code"):
        raise ValueError(f"task {name!r}: {dataset} is not a {kind} dataset")
    if allow_unsandboxed and kind != "code":
        raise ValueError(f"task {name!r}: allow_unsandboxed applies to code tasks only")
    train = load_split(dataset, train_split, manual_dir, data_dir)
    ev = load_split(eval_dataset, eval_split, manual_dir, data_dir)

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    stops = sorted(set(default_stop_ids(tokenizer)) | {int(i) for i in stop_ids})
    return Task(name, train, ev, split_encoder(tokenizer, train_fmt), decode,
                split_rewards(train_fmt, reward_workers, allow_unsandboxed), stops,
                eval_encode=split_encoder(tokenizer, eval_fmt),
                eval_rewards=split_rewards(eval_fmt, reward_workers, allow_unsandboxed))
