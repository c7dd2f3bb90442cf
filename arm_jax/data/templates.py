"""Prompts from the tokenizer's own chat template, with the token span of the question (ARM's c(q) needs it)."""

from __future__ import annotations

import dataclasses
from typing import Optional

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CODE_INSTRUCTION = "Write a Python solution. Put the complete code in a single ```python code block."


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


def build_prompt(tokenizer, question: str, *, system: Optional[str] = None, instruction: Optional[str] = None,
                 instruction_position: str = "after") -> Prompt:
    """Renders [system?, user: question (+ instruction)] with the tokenizer's chat template and the generation
    prompt, tokenizes it and finds the question's token span (tokens whose characters overlap the question).

    instruction: a task line such as MATH_INSTRUCTION, placed after (default) or before the question in the user
    turn; with system=None the template's default system turn (if any) is used.
    """
    if instruction and instruction_position == "after":
        user = f"{question}\n{instruction}"
        q_start_in_user = 0
    elif instruction:
        user = f"{instruction}\n{question}"
        q_start_in_user = len(instruction) + 1
    else:
        user, q_start_in_user = question, 0
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
