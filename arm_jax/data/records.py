"""Reading the files researchers download (JSONL, JSON, Parquet) into one normalized record layout.

Normalized record (every field a string): id, question, answer (the gold final answer; '' for code),
solution (reference solution/rationale, may be ''), tests (JSON: code tests), entry_point (HumanEval), source.
Each source's parser names the file, line and field of a malformed record (`DataError`).
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Any, Callable, Iterator, Optional

FIELDS = ("id", "question", "answer", "solution", "tests", "entry_point", "source")


class DataError(ValueError):
    """A dataset file or record is malformed; the message names the file, the line/row and the field."""


def read_rows(path: str) -> Iterator[tuple[int, dict]]:
    """(1-based line or row number, raw dict) from .jsonl / .jsonl.gz / .json (a list) / .parquet."""
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:  # pragma: no cover - pyarrow ships with the install
            raise DataError(f"{path}: reading Parquet needs pyarrow") from e
        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    if path.endswith(".json"):
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON ({e})") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        yield from enumerate(data, start=1)
        return
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object")
            yield i, row


class Row:
    """Field access with errors naming file, line and field."""

    def __init__(self, raw: dict, path: str, line: int):
        self.raw, self.where = raw, f"{os.path.basename(path)}:{line}"

    def get(self, *names: str, required: bool = True, default: Any = "") -> Any:
        for n in names:
            if n in self.raw and self.raw[n] is not None:
                return self.raw[n]
        if required:
            raise DataError(f"{self.where}: missing field {' or '.join(repr(n) for n in names)} "
                            f"(fields present: {sorted(self.raw)})")
        return default


def _number_text(x: Any) -> str:
    """27.0 -> '27'; 0.5 -> '0.5'; strings unchanged."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x).strip()


def _record(id_, question, answer="", solution="", tests=None, entry_point="", source="") -> dict[str, str]:
    return {"id": str(id_), "question": str(question), "answer": _number_text(answer), "solution": str(solution),
            "tests": json.dumps(tests or {}), "entry_point": str(entry_point), "source": source}


def parse_gsm8k(r: Row, n: int) -> dict:
    """A GSM8K record -> {question, answer (the number after ####), solution}."""
    from arm_jax.data.answers import extract_gsm8k
    rationale = r.get("answer")
    gold = extract_gsm8k(rationale)
    if gold is None:
        raise DataError(f"{r.where}: field 'answer' has no '#### <number>' final answer")
    return _record(r.get("idx", "id", required=False, default=n), r.get("question"), gold, rationale,
                   source="gsm8k")


def parse_math(r: Row, n: int) -> dict:
    """MATH (hendrycks): problem, solution (answer = its last \\boxed{}); MATH-500 also has `answer`."""
    from arm_jax.data.answers import extract_boxed
    solution = r.get("solution", required=False)
    answer = r.get("answer", required=False, default=None)
    if answer is None:
        answer = extract_boxed(solution) if solution else None
        if answer is None:
            raise DataError(f"{r.where}: no field 'answer' and field 'solution' has no \\boxed{{}} answer")
    return _record(r.get("unique_id", "id", required=False, default=n), r.get("problem"), answer, solution,
                   source="math")


def parse_problem_answer(r: Row, n: int) -> dict:
    """AIME 2024/2025, AMC 2023, DeepScaleR: problem (or question), answer (+ solution)."""
    return _record(r.get("id", "ID", required=False, default=n), r.get("problem", "question"), r.get("answer"),
                   r.get("solution", required=False), source="competition")


def parse_dapo(r: Row, n: int) -> dict:
    """DAPO-Math-17k (verl RL layout): prompt = [{role, content}], reward_model = {ground_truth, style}. The user
    message is DAPO_PREFIX + problem + DAPO_SUFFIX (`arm_jax.data.templates`); the record's question is the problem
    alone (the task asks it in DAPO's format again, and ARM's c(q) averages the problem, not the instruction)."""
    from arm_jax.data.templates import DAPO_PREFIX, DAPO_SUFFIX
    prompt = r.get("prompt")
    if isinstance(prompt, str):
        content = prompt
    else:
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            raise DataError(f"{r.where}: field 'prompt' has no user message")
        content = users[-1]
    if not (content.startswith(DAPO_PREFIX) and content.endswith(DAPO_SUFFIX)):
        raise DataError(f"{r.where}: field 'prompt': the user message is not DAPO-Math-17k's (it should start "
                        f"with {DAPO_PREFIX[:40]!r}... and end with {DAPO_SUFFIX!r}); starts {content[:60]!r}")
    question = content[len(DAPO_PREFIX):len(content) - len(DAPO_SUFFIX)]
    rm = r.get("reward_model")
    if not isinstance(rm, dict) or "ground_truth" not in rm:
        raise DataError(f"{r.where}: field 'reward_model' lacks 'ground_truth'")
    extra = r.get("extra_info", required=False, default={}) or {}
    rec = _record(extra.get("index", n), question, rm["ground_truth"], source=r.get("data_source", required=False))
    if isinstance(rm["ground_truth"], str):  # as written: the reference normalises the raw gold (spaces included)
        rec["answer"] = rm["ground_truth"]
    return rec


def parse_humaneval(r: Row, n: int) -> dict:
    """A HumanEval record -> {question (the prompt), tests, entry_point}."""
    return _record(r.get("task_id"), r.get("prompt"), "", r.get("canonical_solution"),
                   tests={"test": r.get("test")}, entry_point=r.get("entry_point"), source="humaneval")


def parse_mbpp(r: Row, n: int) -> dict:
    """An MBPP record -> {question (text + first test), tests (asserts, setup)}."""
    tests = r.get("test_list")
    if not isinstance(tests, list) or not tests:
        raise DataError(f"{r.where}: field 'test_list' must be a non-empty list of assert statements")
    question = f"{r.get('text', 'prompt')}\nYour code should pass this test:\n{tests[0]}"
    return _record(r.get("task_id"), question, "", r.get("code", required=False),
                   tests={"setup": r.get("test_setup_code", required=False), "asserts": list(tests),
                          "challenge": list(r.get("challenge_test_list", required=False, default=[]) or [])},
                   source="mbpp")


def read_records(path: str, parser: Callable[[Row, int], dict], limit: Optional[int] = None) -> Iterator[dict]:
    """The file's rows (`read_rows`: JSONL / JSON / Parquet) through `parser`, as normalized records; a bad field
    or an empty question is a DataError naming the file and line."""
    for count, (line, raw) in enumerate(read_rows(path)):
        if limit is not None and count >= limit:
            return
        rec = parser(Row(raw, path, line), count)
        if not rec["question"].strip():
            raise DataError(f"{os.path.basename(path)}:{line}: empty question")
        yield rec
