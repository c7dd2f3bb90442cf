"""config.json read as transformers reads it: RoPE scaling (YaRN and llama3 without
`original_max_position_embeddings` take `max_position_embeddings`, was a silent 8192; a top-level value wins) and
the stop ids (generation_config.json's eos list, e.g. Llama-3's <|eot_id|>, was ignored)."""

import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from arm_jax.models.hf import config_from_hf
from arm_jax.models.layers import rope_attention_factor, rope_inv_freq

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=100, max_position_embeddings=32768, rope_theta=1e6)
CASES = [
    ("LlamaConfig", "llama", dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0), {}),
    ("Qwen2Config", "qwen2", dict(rope_type="yarn", factor=4.0), {}),
    ("Qwen2Config", "qwen2", dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=4096), {}),
    ("Qwen2Config", "qwen2", dict(rope_type="yarn", factor=4.0), dict(original_max_position_embeddings=2048)),
]


@pytest.mark.parametrize("cls, model_type, scaling, top", CASES)
def test_rope_scaling_matches_transformers(cls, model_type, scaling, top):
    raw = dict(BASE, model_type=model_type, rope_scaling=dict(scaling), **top)  # the v4 spelling users have on disk
    ours = config_from_hf(dict(raw), "config.json")
    ref_cfg = getattr(transformers, cls)(**{k: v for k, v in raw.items() if k != "model_type"})
    inv_ref, attn_ref = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](ref_cfg, torch.device("cpu"))
    inv = rope_inv_freq(ours.head_dim, ours.rope)
    np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-6)
    assert rope_attention_factor(ours.rope) == pytest.approx(attn_ref, rel=1e-6)
    expected = top.get("original_max_position_embeddings", scaling.get("original_max_position_embeddings", 32768))
    assert ours.rope.original_max_position_embeddings == expected


def test_stop_ids_include_generation_config_eos_list(hf_model, mesh1, tmp_path):
    import arm_jax as aj
    from arm_jax.data.tokenizers import qwen2_tokenizer
    from arm_jax.rewards.tasks import make_task
    folder = tmp_path / "llama3_instruct"
    shutil.copytree(hf_model("llama3")[0], folder)
    json.dump({"bos_token_id": 1, "eos_token_id": [2, 7, 9]}, open(folder / "generation_config.json", "w"))
    policy = aj.load_policy(str(folder), mesh=mesh1, load_tokenizer=False)
    assert policy.config.eos_token_ids == (2, 7, 9)  # config.json's 2, then the generation config's list
    data = tmp_path / "data"
    data.mkdir()
    (data / "math500_test.jsonl").write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n")
    task = make_task("math:math500", tokenizer=qwen2_tokenizer(str(tmp_path / "tok")), manual_dir=str(data),
                     data_dir=str(tmp_path / "tfds"), train_split="test", stop_ids=policy.config.eos_token_ids)
    assert {2, 7, 9, 151643, 151645} <= set(task.stop_ids)
