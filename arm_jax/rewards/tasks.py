"""Tasks: where prompts come from, how they are tokenized (with the question span), how completions are decoded
and which rewards grade them. `make_task(name, ...)` builds one:

- 'countdown': the repo's mini-Countdown (no files needed; the quick-start task);
- 'math:<dataset>' for gsm8k, math, math500, aime24, aime25, amc23, dapo_math_17k, deepscaler (files in
  manual_dir);
- 'code:humaneval' / 'code:mbpp' (sandboxed code rewards).

Each split is asked and graded in its own dataset's format (`arm_jax.data.templates.dataset_format`): under
'math:dapo_math_17k' the training prompts are DAPO's (`Answer:` line, graded by the 'dapo' rule) while a MATH-500
held-out split gets the boxed instruction and boxed grading, exactly as `python -m arm_jax.eval` asks it
(`split_encoder` and `split_rewards` serve both). Every task takes the same shaping options (`Shaping`: DAPO's
overlong penalty and a format bonus, with weights), added to the training split's verifier only.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
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


@dataclasses.dataclass(frozen=True)
class Shaping:
    """The training split's shaping terms (task options, `experiment.task_kwargs`), added to its verifier. The
    held-out split is graded by its verifier alone: Pass@k reads accuracy, and shaping would only cost time there.

    Weights are relative to the verifier's scale, whichever it is: ours score 0/1 by default; DAPO's recipe scores
    +1/-1 (a span of 2; math tasks' reward_values=(1, -1)), so a weight w on +1/-1 is the relative weight w/2 on
    0/1. Advantages are normalized per group, so only these ratios matter.

    overlong_buffer (0 = off): DAPO's soft overlong punishment (`registry.overlong_penalty`, the 'overlong' term),
        in tokens: a response longer than max_len - overlong_buffer loses linearly more, down to -1 at max_len, the
        run's response budget (RLConfig.max_new_tokens) and beyond. DAPO: a 4096-token buffer of 20480.
    overlong_weight (None = DAPO's relative weight at the verifier's scale): its weight. DAPO adds the penalty
        with factor 1.0 to a +1/-1 verifier, half the span between a right and a wrong answer; None gives that half
        span, 0.5 on a 0/1 verifier and 1.0 on +1/-1. A number is used as given, on the verifier's scale.
    format_weight (0.0 = off): a 0/1 bonus of this weight for a completion in the layout `format_pattern` names
        (the 'format' term); e.g. 0.1 is a tenth of a right answer on a 0/1 verifier.
    format_pattern (None = the layout the training prompts ask for, `rewards.format.default_pattern`: 'boxed',
        DAPO's 'answer_line' or 'code_block'): one of `rewards.format.PATTERNS`.
    """

    overlong_buffer: int = 0
    overlong_weight: Optional[float] = None
    format_weight: float = 0.0
    format_pattern: Optional[str] = None

    def __post_init__(self):
        from arm_jax.rewards.format import PATTERNS
        if not (isinstance(self.overlong_buffer, int) and not isinstance(self.overlong_buffer, bool)
                and self.overlong_buffer >= 0):  # True is not a 1-token buffer
            raise ValueError(f"task option overlong_buffer must be a number of tokens >= 0 (0 = off), got "
                             f"{self.overlong_buffer!r}")
        for option in ("overlong_weight", "format_weight"):
            w = getattr(self, option)
            if w is None and option == "overlong_weight":
                continue
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"task option {option} must be a number >= 0 (a weight on the verifier's scale), "
                                 f"got {w!r}")
        if self.format_pattern is not None and self.format_pattern not in PATTERNS:
            raise ValueError(f"task option format_pattern must be one of {PATTERNS} (or None), got "
                             f"{self.format_pattern!r}")

    def specs(self, answer_format: Optional[str], values: tuple = (1.0, 0.0)) -> list[RewardSpec]:
        """The shaping terms for a split asked in `answer_format` (its default format pattern) whose verifier scores
        values = (right, wrong)."""
        from arm_jax.rewards.format import default_pattern
        out = []
        if self.overlong_buffer:
            weight = (values[0] - values[1]) / 2 if self.overlong_weight is None else self.overlong_weight
            out.append(RewardSpec("overlong", float(weight), kwargs=(("cache_len", self.overlong_buffer),)))
        if self.format_weight:
            pattern = self.format_pattern or default_pattern(answer_format)
            out.append(RewardSpec("format", self.format_weight, kwargs=(("pattern", pattern),)))
        return out


SHAPING_OPTIONS = tuple(f.name for f in dataclasses.fields(Shaping))
_COUNTDOWN_OPTIONS = ("task_seed", "num_heldout")


def _countdown(shaping: Shaping, task_seed: int = 1234, num_heldout: int = 200, stop_ids: Sequence[int] = ()) -> Task:
    """Mini-Countdown: the 'countdown' verifier on a boxed expression, plus the shaping terms in training."""
    from arm_jax.data import countdown as cd
    import arm_jax.rewards.countdown  # noqa: F401 - registers the 'countdown' reward

    def encode(rec):
        ids = cd.prompt_ids(rec["question"])
        return ids, [0] + [1] * (len(ids) - 1)  # c(q) over the question, not BOS

    train, heldout = cd.splits(task_seed, num_heldout)
    verifier = [RewardSpec("countdown", accuracy=True)]
    stops = sorted({cd.EOS_ID} | {int(i) for i in stop_ids})
    return Task("countdown", train, heldout, encode, cd.decode, verifier + shaping.specs("boxed"), stops,
                cd.sft_example, eval_rewards=verifier)


def split_encoder(tokenizer, fmt: PromptFormat) -> Callable[[dict], tuple[list[int], list[int]]]:
    """record -> (prompt ids, question mask): the chat template around fmt.prefix + question + fmt.suffix, the
    question tokens marked (c(q) averages them, not the instruction)."""
    def encode(rec):
        p = build_prompt(tokenizer, rec["question"], fmt=fmt)
        return p.ids, p.question_mask()
    return encode


def split_rewards(fmt: PromptFormat, reward_workers: int = 2, allow_unsandboxed: bool = False,
                  values: tuple = (1.0, 0.0)) -> list[RewardSpec]:
    """The verifier of a split asked in `fmt`: the sandboxed code reward (allow_unsandboxed: run model-written code
    without isolation where none is available, instead of an error), or the math rule of fmt's answer format with
    `reward_workers` grading processes, scoring values = (correct, incorrect) (math only; the accuracy stays 0/1)."""
    if fmt.answer_format is None:
        return [RewardSpec("code", 1.0, accuracy=True, kwargs=(("allow_unsandboxed", True),) if allow_unsandboxed
                           else ())]
    scale = (("correct", float(values[0])), ("incorrect", float(values[1]))) if tuple(values) != (1.0, 0.0) else ()
    return [RewardSpec("math", 1.0, accuracy=True,
                       kwargs=(("answer_format", fmt.answer_format), ("workers", reward_workers)) + scale)]


def make_task(name: str, tokenizer=None, manual_dir: Optional[str] = None, data_dir: Optional[str] = None,
              train_split: str = "train", eval_split: str = "test", eval_dataset: Optional[str] = None,
              stop_ids: Sequence[int] = (), reward_workers: int = 2, allow_unsandboxed: bool = False,
              answer_format: Optional[str] = None, reward_values: tuple = (1.0, 0.0),
              **options) -> Task:
    """A Task by name: 'countdown', 'math:<dataset>' or 'code:<dataset>' (files from manual_dir, tfds cache in
    data_dir). eval_dataset: the held-out source (default the training dataset's eval_split), asked and graded
    in its own format; stop_ids: extra stop ids (the checkpoint's eos ids, `Policy.eos_token_ids`);
    reward_workers: math grading processes; allow_unsandboxed (code tasks): run model-written code unisolated
    where the sandbox cannot isolate it (logged; otherwise an error before the first step); answer_format (math
    tasks): the training split's rule, named (default: its dataset's, `dataset_format`; e.g. 'dapo', the DAPO
    reference's, or 'dapo_mathverify'); reward_values (math tasks): (correct, incorrect) values of the math verifier
    on both splits, (1, 0) by default, (1, -1) as DAPO's reference.

    options, for every task: the training split's shaping terms, `Shaping`'s fields (overlong_buffer,
    overlong_weight, format_weight, format_pattern); 'countdown' also takes task_seed and num_heldout. Any other
    option is a TypeError naming it."""
    shaping = Shaping(**{k: options.pop(k) for k in SHAPING_OPTIONS if k in options})
    own = _COUNTDOWN_OPTIONS if name == "countdown" else ()
    unknown = sorted(set(options) - set(own))
    if unknown:
        known = [p for p in inspect.signature(make_task).parameters if p not in ("name", "tokenizer", "options")]
        raise TypeError(f"task {name!r} got unknown option(s) {unknown} (experiment.task_kwargs); it takes "
                        f"{known + list(SHAPING_OPTIONS) + list(own)}")
    if name == "countdown":
        return _countdown(shaping, stop_ids=stop_ids, **options)
    kind, _, dataset = name.partition(":")
    if kind not in ("math", "code"):
        raise KeyError(f"unknown task {name!r}: use 'countdown', 'math:<dataset>' or 'code:<dataset>'")
    if tokenizer is None:
        raise ValueError(f"task {name!r} needs a tokenizer (a checkpoint folder with tokenizer files)")
    from arm_jax.data.builders import load_split
    eval_dataset = eval_dataset or dataset
    train_fmt, eval_fmt = dataset_format(dataset), dataset_format(eval_dataset)
    if (train_fmt.answer_format is None) != (kind == "code"):
        raise ValueError(f"task {name!r}: {dataset} is not a {kind} dataset")
    if allow_unsandboxed and kind != "code":
        raise ValueError(f"task {name!r}: allow_unsandboxed applies to code tasks only")
    if answer_format is not None:
        if kind != "math":
            raise ValueError(f"task {name!r}: answer_format applies to math tasks only")
        train_fmt = dataclasses.replace(train_fmt, answer_format=answer_format)
    train = load_split(dataset, train_split, manual_dir, data_dir)
    ev = load_split(eval_dataset, eval_split, manual_dir, data_dir)

    def decode(ids):
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    stops = sorted(set(default_stop_ids(tokenizer)) | {int(i) for i in stop_ids})
    return Task(name, train, ev, split_encoder(tokenizer, train_fmt), decode,
                split_rewards(train_fmt, reward_workers, allow_unsandboxed, reward_values)
                + shaping.specs(train_fmt.answer_format, reward_values if kind == "math" else (1.0, 0.0)), stops,
                eval_encode=split_encoder(tokenizer, eval_fmt),
                eval_rewards=split_rewards(eval_fmt, reward_workers, allow_unsandboxed, reward_values))
