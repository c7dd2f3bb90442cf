"""DAPO-Math-17k in its released layout (verl's RL parquet: one user message PREFIX + problem + SUFFIX, the
integer-string ground truth in reward_model, a uuid per row, every prompt repeated) built from real MATH-500
problems, since the release itself is not in the repository."""

import json
import os
import uuid

from arm_jax.data.templates import DAPO_PREFIX, DAPO_SUFFIX

MATH500 = os.path.join(os.path.dirname(__file__), "fixtures", "data", "math500_test.jsonl")


def math500_records(count: int, integer_answers: bool = True) -> list[dict]:
    """The first `count` MATH-500 records (those with integer answers, as DAPO's ground truths are)."""
    recs = [json.loads(line) for line in open(MATH500)]
    if integer_answers:
        recs = [r for r in recs if r["answer"].lstrip("-").isdigit()]
    return recs[:count]


def dapo_rows(records: list[dict], repeats: int = 3) -> list[dict]:
    """Rows in the release's layout, each problem `repeats` times, interleaved as the release's copies are."""
    rows = []
    for _ in range(repeats):
        for r in records:
            rows.append({"data_source": "math_dapo", "ability": "MATH",
                         "prompt": [{"role": "user", "content": DAPO_PREFIX + r["problem"] + DAPO_SUFFIX}],
                         "reward_model": {"ground_truth": r["answer"], "style": "rule-lighteval/MATH_v2"},
                         "extra_info": {"index": str(uuid.uuid4())}})
    return rows


def write_dapo_parquet(path, records: list[dict], repeats: int = 3) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(dapo_rows(records, repeats)), str(path))
