"""Prompts from the tokenizer's own chat template, with the token span of the question (ARM's c(q) needs it), and
the prompt formats of the datasets (the instruction around the question and the answer format it asks for)."""

from __future__ import annotations

import dataclasses
from typing import Optional

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Write a Python solution. Put the complete code in a single ```python code block."
# DAPO-Math-17k's user message is DAPO_PREFIX + problem + DAPO_SUFFIX (every row of the release)
DAPO_PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
               "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."


@dataclasses.dataclass(frozen=True)
class PromptFormat:
    """How a split's questions are asked and answered: the user turn is prefix + question + suffix (the
    instruction, not part of ARM's question span); answer_format is what the instruction asks for and how the
    math grader extracts it ('boxed', 'dapo', 'gsm8k', 'auto'; None for code)."""

    prefix: str = ""
    suffix: str = ""
    answer_format: Optional[str] = "boxed"


BOXED = PromptFormat(suffix="\n" + MATH_INSTRUCTION, answer_format="boxed")
GSM8K = PromptFormat(suffix="\n" + MATH_INSTRUCTION, answer_format="auto")  # a box, else GSM8K's '#### N'
DAPO = PromptFormat(prefix=DAPO_PREFIX, suffix=DAPO_SUFFIX, answer_format="dapo")
CODE = PromptFormat(suffix="\n" + CODE_INSTRUCTION, answer_format=None)
CODE_DATASETS = ("humaneval", "mbpp")


def dataset_format(dataset: str) -> PromptFormat:
    """The prompt format a dataset's records are asked in: DAPO-Math-17k its own ('Answer:' line), code datasets
    the code instruction, GSM8K and every other math set the boxed instruction (GSM8K also graded on '#### N')."""
    if dataset == "dapo_math_17k":
        return DAPO
    if dataset in CODE_DATASETS:
        return CODE
    return GSM8K if dataset == "gsm8k" else BOXED


@dataclasses.dataclass(frozen=True)
class Prompt:
    """ids: the templated prompt's token ids; question_span: [start, end) token indices of the question text;
    text: the rendered prompt."""

    ids: list[int]
    question_span: tuple[int, int]
    text: str

    def question_mask(self, left_pad: int = 0, length: Optional[int] = None) -> list[int]:
        """0/1 per token (after `left_pad` padding) marking the question span."""
        n = length if length is not None else left_pad + len(self.ids)
        s, e = self.question_span
        return [1 if left_pad + s <= i < left_pad + e else 0 for i in range(n)]


def build_prompt(tokenizer, question: str, *, system: Optional[str] = None,
                 fmt: PromptFormat = PromptFormat()) -> Prompt:
    """Renders [system?, user: fmt.prefix + question + fmt.suffix] with the tokenizer's chat template and the
    generation prompt, tokenizes it and finds the question's token span (tokens whose characters overlap the
    question; the prefix and suffix are instruction, outside it). With system=None the template's default system
    turn (if any) is used.
    """
    user, q_start_in_user = fmt.prefix + question + fmt.suffix, len(fmt.prefix)
    messages = ([{"role": "system", "content": system}] if system is not None else []) + \
        [{"role": "user", "content": user}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    user_at = text.rfind(user)
    if user_at < 0:
        raise ValueError("the chat template does not contain the user message verbatim; cannot locate the question")
    q_begin = user_at + q_start_in_user
    q_end = q_begin + len(question)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(offsets) if b > q_begin and a < q_end]
    if not inside:
        raise ValueError("the question produced no tokens")
    return Prompt(list(ids), (inside[0], inside[-1] + 1), text)
