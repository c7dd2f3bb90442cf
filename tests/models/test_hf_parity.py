"""arm_jax logits against transformers' PyTorch models on the same checkpoints (float32, eager attention)."""

import json
import os

import numpy as np
import pytest
import torch

import arm_jax as aj
from arm_jax.models import num_params
from tests import hf_models

ATOL = 1e-4


def _masked_max_diff(a, b, mask):
    return float(np.max(np.abs(a - b) * mask[..., None]))


@pytest.mark.parametrize("kind", sorted(hf_models.KINDS))
def test_logits_match_transformers(kind, hf_model, mesh1):
    folder, ref_model = hf_model(kind)
    policy = aj.load_policy(folder, mesh=mesh1)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size)
    ours = np.asarray(aj.forward_logits(policy, tokens, mask))
    ref = hf_models.reference_logits(ref_model, tokens, mask)
    diff = _masked_max_diff(ours, ref, mask)
    print(f"{kind}: max |logits - transformers| = {diff:.2e}")
    assert diff < ATOL
    assert np.std(ref[mask == 1]) > 0.5  # the comparison is not between near-constant logits


def test_config_fields_follow_the_checkpoint(hf_model, mesh1):
    cfg = aj.load_policy(hf_model("qwen3_odd")[0], mesh=mesh1).config
    assert (cfg.model_type, cfg.hidden_size, cfg.head_dim, cfg.num_kv_heads) == ("qwen3", 75, 16, 2)
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.rope.theta == 1e6
    cfg = aj.load_policy(hf_model("llama3")[0], mesh=mesh1).config
    assert cfg.rope.rope_type == "llama3" and cfg.rope.factor == 8.0 and cfg.rope.original_max_position_embeddings == 64
    cfg = aj.load_policy(hf_model("qwen2_tied")[0], mesh=mesh1).config
    assert cfg.tie_word_embeddings and cfg.qkv_bias and cfg.eos_token_ids == (2,)
    cfg = aj.load_policy(hf_model("starcoder2_swa")[0], mesh=mesh1).config
    assert (cfg.norm_type, cfg.mlp_type, cfg.sliding_window, cfg.rms_norm_eps) == ("layer", "plain", 5, 1e-5)
    assert cfg.qkv_bias and cfg.o_bias and cfg.mlp_bias and cfg.tie_word_embeddings and cfg.hidden_act == "relu"
    assert num_params(cfg) == sum(p.numel() for p in hf_model("starcoder2_swa")[1].parameters())


def test_v4_config_spelling(hf_model, mesh1, tmp_path):
    """A transformers-v4 config.json (top-level rope_theta / rope_scaling with `type`, torch_dtype) loads the same."""
    folder, ref_model = hf_model("llama3")
    raw = json.load(open(os.path.join(folder, "config.json")))
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    raw["rope_scaling"] = rope
    raw["torch_dtype"] = raw.pop("dtype", "float32")
    os.symlink(os.path.join(folder, "model.safetensors"), tmp_path / "model.safetensors")
    json.dump(raw, open(tmp_path / "config.json", "w"))
    v4 = aj.load_policy(str(tmp_path), mesh=mesh1)
    v5 = aj.load_policy(folder, mesh=mesh1)
    assert v4.config == v5.config
    tokens, mask = hf_models.padded_batch(v4.config.vocab_size)
    np.testing.assert_allclose(np.asarray(aj.forward_logits(v4, tokens, mask)),
                               hf_models.reference_logits(ref_model, tokens, mask), atol=ATOL)


def test_round_trip_through_transformers(hf_model, mesh1, tmp_path):
    """arm_jax load -> save (sharded into several files) -> transformers load: same logits; arm_jax reloads it."""
    from transformers import AutoModelForCausalLM
    for kind in ("qwen2_tied", "qwen3_odd", "starcoder2_swa"):
        folder, ref_model = hf_model(kind)
        policy = aj.load_policy(folder, mesh=mesh1)
        out = tmp_path / kind
        aj.save_policy(policy, str(out), max_shard_bytes=20_000)
        assert os.path.isfile(out / "model.safetensors.index.json")
        assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) > 1
        reloaded = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
        tokens, mask = hf_models.padded_batch(policy.config.vocab_size)
        before = hf_models.reference_logits(ref_model, tokens, mask)
        after = hf_models.reference_logits(reloaded.eval(), tokens, mask)
        assert _masked_max_diff(before, after, mask) < 1e-6
        again = aj.load_policy(str(out), mesh=mesh1)
        assert again.config == policy.config
        assert _masked_max_diff(np.asarray(aj.forward_logits(again, tokens, mask)), before, mask) < ATOL


def test_sharded_hf_checkpoint_loads(hf_model, mesh1):
    folder, ref_model = hf_model("qwen2_gqa7", max_shard_size="50KB")
    assert os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
    policy = aj.load_policy(folder, mesh=mesh1)
    tokens, mask = hf_models.padded_batch(policy.config.vocab_size)
    ours = np.asarray(aj.forward_logits(policy, tokens, mask))
    assert _masked_max_diff(ours, hf_models.reference_logits(ref_model, tokens, mask), mask) < ATOL


def test_bf16_checkpoint_loads_bit_exact(tmp_path, mesh1):
    model = hf_models.build("qwen2_gqa7").to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    policy = aj.load_policy(str(tmp_path), dtype="bfloat16", mesh=mesh1)
    assert policy.config.dtype == "bfloat16"
    q = np.asarray(policy.params["layers"][1]["attn"]["q"][...].astype("float32"))
    ref = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*Dh, D]
    np.testing.assert_array_equal(q, ref.T.reshape(q.shape))
    emb = np.asarray(policy.params["embed"][...].astype("float32"))
    np.testing.assert_array_equal(emb, model.model.embed_tokens.weight.detach().float().numpy())
    # bf16 weights upcast to float32 reproduce the float32 model's logits.
    f32 = aj.load_policy(str(tmp_path), dtype="float32", mesh=mesh1)
    tokens, mask = hf_models.padded_batch(f32.config.vocab_size)
    from transformers import AutoModelForCausalLM
    ref32 = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager", dtype=torch.float32)
    ref_logits = hf_models.reference_logits(ref32.eval(), tokens, mask)
    assert _masked_max_diff(np.asarray(aj.forward_logits(f32, tokens, mask)), ref_logits, mask) < ATOL
