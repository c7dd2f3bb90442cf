"""W&B logging (`--wandb_project`) in offline mode: the quick-start launcher writes an offline run holding every
metric of the loop, the gin configuration, sample tables and the evaluation's Pass@k plot; a relaunch of the same
workdir continues the same run id."""

import glob
import os

import pytest

from tests.train.test_loop import _launch

pytest.importorskip("wandb")


def wandb_records(path: str) -> list:
    """The protobuf records of an offline run file (W&B's log format: a 7-byte header, then 32 KiB blocks of
    chunks with a 4-byte checksum, a 2-byte length and a 1-byte type: 1 whole, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = open(path, "rb").read()
    assert data[:4] == b":W&B", path
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def _logged(workdir) -> tuple[set, dict, set]:
    """(history keys, {step: n values}, config keys) over every offline run file of the workdir."""
    keys, steps, config = set(), {}, set()
    for path in glob.glob(os.path.join(workdir, "wandb", "offline-run-*", "run-*.wandb")):
        for rec in wandb_records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "history":
                items = {(i.key or "/".join(i.nested_key)): i.value_json for i in rec.history.item}
                step = int(items.get("_step", "-1"))
                steps[step] = steps.get(step, 0) + 1
                keys |= {k for k in items if not k.startswith("_")}
            elif kind in ("config", "run"):  # the initial config rides in the run record
                updates = rec.config.update if kind == "config" else rec.run.config.update
                config |= {(i.key or "/".join(i.nested_key)) for i in updates}
    return keys, steps, config


def test_offline_run_logs_every_metric_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _launch(tmp_path, ["RLConfig.steps=2", "RLConfig.eval_every=2"] + ["experiment.wandb_project='arm_jax_test'"])
    run_id = open(tmp_path / "wandb_run_id").read().strip()
    keys, steps, config = _logged(tmp_path)
    jsonl = [__import__("json").loads(line) for line in open(tmp_path / "metrics.jsonl")]
    numeric = {k for row in jsonl for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    assert numeric <= keys, sorted(numeric - keys)  # every metric of metrics.jsonl reached W&B
    assert {"mismatch/kl_k3", "eval/pass@1", "reward_mean", "samples/nrows", "eval/pass_at_k_table/nrows"} <= keys
    assert set(steps) >= {0, 1, 2} and "gin" in config
    assert "_wandb/visualize/eval/pass_at_k" in config  # the Pass@k line plot over the logged table
    _launch(tmp_path, ["RLConfig.steps=3", "RLConfig.eval_every=2", "experiment.wandb_project='arm_jax_test'"])
    assert open(tmp_path / "wandb_run_id").read().strip() == run_id
    runs = glob.glob(os.path.join(tmp_path, "wandb", "offline-run-*"))
    assert len(runs) == 2 and all(r.endswith(run_id) for r in runs)  # the relaunch continued the same run
    assert 3 in _logged(tmp_path)[1]


def _tb_steps(workdir) -> dict:
    """{tag: sorted steps} over a TensorBoard folder's event files (TFRecord framing: length, crc, data, crc)."""
    from tensorboardX.proto import event_pb2
    out: dict = {}
    for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
        data, pos = open(path, "rb").read(), 0
        while pos + 12 <= len(data):
            n = int.from_bytes(data[pos:pos + 8], "little")
            ev = event_pb2.Event()
            ev.ParseFromString(data[pos + 12:pos + 12 + n])
            pos += 16 + n
            for v in ev.summary.value:
                out.setdefault(v.tag, []).append(ev.step)
    return {k: sorted(v) for k, v in out.items()}


def test_a_relaunch_on_a_fresh_machine_continues_the_run(tmp_path, monkeypatch):
    """The checkpoint (a bucket on a pod) outlives the workdir: relaunched from it with an empty workdir, the run
    continues the same W&B run id and TensorBoard holds the checkpointed history's steps, once each (before: a new
    W&B run and curves starting at the resumed step)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    ckpt = str(tmp_path / "bucket")
    opts = ["RLConfig.eval_every=0", "experiment.wandb_project='arm_jax_test'", f"experiment.checkpoint_dir='{ckpt}'"]
    _launch(tmp_path / "first", ["RLConfig.steps=2"] + opts)
    run_id = open(tmp_path / "first" / "wandb_run_id").read().strip()
    _launch(tmp_path / "fresh", ["RLConfig.steps=3"] + opts)
    assert open(tmp_path / "fresh" / "wandb_run_id").read().strip() == run_id
    assert glob.glob(os.path.join(tmp_path, "fresh", "wandb", f"offline-run-*-{run_id}"))
    assert _tb_steps(tmp_path / "fresh")["reward_mean"] == [1, 2, 3]
