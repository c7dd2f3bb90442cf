"""Bad checkpoints and configs fail loudly, naming the culprit."""

import json
import os
import shutil

import pytest
from safetensors.numpy import load_file, save_file

import arm_jax as aj


def _copy(folder, dst):
    shutil.copytree(folder, dst)
    return str(dst)


def test_renamed_tensor(hf_model, mesh1, tmp_path):
    folder = _copy(hf_model("qwen2_gqa7")[0], tmp_path / "ckpt")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.1.mlp.gate_projj.weight"] = tensors.pop("model.layers.1.mlp.gate_proj.weight")
    save_file(tensors, path)
    with pytest.raises(aj.CheckpointError, match=r"missing tensor\(s\) \['model\.layers\.1\.mlp\.gate_proj\.weight'\]"):
        aj.load_policy(folder, mesh=mesh1)


def test_unexpected_tensor(hf_model, mesh1, tmp_path):
    folder = _copy(hf_model("qwen2_gqa7")[0], tmp_path / "ckpt")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.extra.weight"] = tensors["model.norm.weight"]
    save_file(tensors, path)
    with pytest.raises(aj.CheckpointError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.extra\.weight' "
                                                 r"in model\.safetensors"):
        aj.load_policy(folder, mesh=mesh1)


def test_wrong_shape(hf_model, mesh1, tmp_path):
    folder = _copy(hf_model("qwen3_odd")[0], tmp_path / "ckpt")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:-16]
    save_file(tensors, path)
    with pytest.raises(aj.CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' in "
                                                 r".*model\.safetensors has shape \(16, 75\), but config\.json "
                                                 r"implies \(32, 75\)"):
        aj.load_policy(folder, mesh=mesh1)


def _edit_config(folder, tmp_path, **changes):
    folder = _copy(folder, tmp_path / "ckpt")
    path = os.path.join(folder, "config.json")
    raw = json.load(open(path))
    raw.update(changes)
    json.dump(raw, open(path, "w"))
    return folder


def test_unsupported_architecture(hf_model, mesh1, tmp_path):
    folder = _edit_config(hf_model("qwen2_tied")[0], tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(aj.ConfigError, match=r"config\.json: model_type='gpt2' .*GPT2LMHeadModel.* not supported"):
        aj.load_policy(folder, mesh=mesh1)


@pytest.mark.parametrize("change, pattern", [
    (dict(use_sliding_window=True), "use_sliding_window=true is not supported"),
    (dict(hidden_act="quick_gelu"), "hidden_act='quick_gelu' is not supported"),
    (dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e6, "factor": 4.0}),
     "rope_type='dynamic' is not supported"),
    (dict(num_key_value_heads=3), r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"),
])
def test_unsupported_options(hf_model, mesh1, tmp_path, change, pattern):
    folder = _edit_config(hf_model("qwen2_tied")[0], tmp_path, **change)
    with pytest.raises(aj.ConfigError, match=pattern):
        aj.load_policy(folder, mesh=mesh1)


def test_bad_starcoder2_sliding_window(hf_model, mesh1, tmp_path):
    folder = _edit_config(hf_model("starcoder2_swa")[0], tmp_path, sliding_window=0)
    pattern = r"config\.json: .*sliding_window must be None or a positive integer, got 0"
    with pytest.raises(aj.ConfigError, match=pattern):
        aj.load_policy(folder, mesh=mesh1)


def test_missing_folder_and_files(mesh1, tmp_path):
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        aj.load_policy(str(tmp_path / "does_not_exist"), mesh=mesh1)
    with pytest.raises(aj.CheckpointError, match="no config.json"):
        aj.load_policy(str(tmp_path), mesh=mesh1)


def test_index_pointing_at_missing_file(hf_model, mesh1, tmp_path):
    folder = _copy(hf_model("qwen2_gqa7", max_shard_size="50KB")[0], tmp_path / "ckpt")
    index = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[-1]
    os.remove(os.path.join(folder, victim))
    with pytest.raises(aj.CheckpointError, match=f"lists '{victim}', which is not in"):
        aj.load_policy(folder, mesh=mesh1)


def test_token_out_of_range(hf_model, mesh1):
    policy = aj.load_policy(hf_model("qwen2_tied")[0], mesh=mesh1)
    with pytest.raises(ValueError, match=r"vocab_size=211"):
        aj.forward_logits(policy, [[1, 2, 500]])
