"""Shared pieces of the experiments/bench_*.py scripts: model shapes, timing, memory, table + JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from typing import Callable

import jax
import numpy as np

import arm_jax as aj

# The shapes of the peers' measured H100 baselines (Qwen2.5-0.5B / 1.5B / 7B configs, random weights).
SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=128, intermediate_size=352, num_layers=4, num_heads=4,
                 num_kv_heads=2, head_dim=32, tie_word_embeddings=True),
    "small": dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                  num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14,
                 num_kv_heads=2, head_dim=64, tie_word_embeddings=True),
    "1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28, num_heads=12,
                 num_kv_heads=2, head_dim=128, tie_word_embeddings=True),
}
# DeepSeek-V2 (MLA + MoE) shapes: a small CPU one and DeepSeek-V2-Lite's (15.7 B total, 2.4 B active).
DEEPSEEK_SHAPES = {
    "ds-small": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8,
                     mla=dict(kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32),
                     moe=dict(num_experts=16, experts_per_token=4, expert_size=128, num_shared_experts=2,
                              first_k_dense_replace=1)),
    "v2-lite": dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, num_layers=27, num_heads=16,
                    mla=dict(kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128),
                    moe=dict(num_experts=64, experts_per_token=6, expert_size=1408, num_shared_experts=2,
                             first_k_dense_replace=1)),
}


def model_config(shape: str, dtype: str, moe_impl: str = "ragged") -> aj.ModelConfig:
    if shape in DEEPSEEK_SHAPES:
        from arm_jax.config import MLAConfig, MoEConfig
        s = dict(DEEPSEEK_SHAPES[shape])
        mla, moe = MLAConfig(**s.pop("mla")), MoEConfig(**s.pop("moe"), impl=moe_impl)
        return aj.ModelConfig(model_type="deepseek_v2", num_kv_heads=s["num_heads"], head_dim=mla.qk_head_dim,
                              qkv_bias=False, mla=mla, moe=moe, dtype=dtype, **s)
    return aj.ModelConfig(model_type="qwen2", qkv_bias=True, rope=aj.RopeConfig(theta=1e6), dtype=dtype,
                          **SHAPES[shape])


def hf_config(cfg: aj.ModelConfig):
    if cfg.mla is not None:
        from transformers import DeepseekV2Config

        from arm_jax.models.hf import config_to_hf
        raw = config_to_hf(cfg)
        raw.pop("architectures"), raw.pop("model_type")
        return DeepseekV2Config(**raw)
    from transformers import Qwen2Config
    return Qwen2Config(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                       num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                       tie_word_embeddings=cfg.tie_word_embeddings, rope_theta=cfg.rope.theta)


def time_fn(fn: Callable[[], object], *, warmup: int = 1, iters: int = 3) -> float:
    """Median wall seconds of fn() (blocked until ready) after warm-up calls."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def peak_memory_gib() -> float:
    """Peak device memory when the backend reports it (GPU/TPU), else the process's peak RSS."""
    stats = jax.local_devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def device_info() -> dict:
    d = jax.devices()[0]
    return {"backend": jax.default_backend(), "device": d.device_kind, "num_devices": jax.device_count(),
            "host": platform.node(), "cpu_count": os.cpu_count(), "jax": jax.__version__}


def report(title: str, rows: list[dict], out: str | None, extra: dict | None = None) -> None:
    """Prints rows as a Markdown table and writes {info, rows} as JSON."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print(f"\n## {title}\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    if out:
        with open(out, "w") as f:
            json.dump({"info": device_info(), **(extra or {}), "rows": rows}, f, indent=2)
        print(f"\nwrote {out}")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def base_parser(doc: str, out: str, iters: int):
    """The options every bench shares: --shape, --dtype, --iters, --no_torch, --out."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES) + sorted(DEEPSEEK_SHAPES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--moe_impl", default="ragged", choices=["ragged", "dense"], help="DeepSeek shapes' experts")
    ap.add_argument("--no_torch", action="store_true", help="skip the transformers (PyTorch) side")
    ap.add_argument("--out", default=out)
    return ap


def torch_model(cfg: aj.ModelConfig, train: bool = False):
    """The same architecture in transformers (random weights, SDPA attention) on CUDA if present, else CPU."""
    import torch
    from transformers import AutoModelForCausalLM
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_config(hf_config(cfg), dtype=dtype, attn_implementation="sdpa").to(device)
    model.train(train)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return model, device


def time_torch(fn: Callable[[], object], device: str, *, warmup: int = 1, iters: int = 3) -> tuple[float, object]:
    """(median seconds of fn() with CUDA synchronization, peak CUDA GiB or None)."""
    import torch

    def run():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else None
    return float(np.median(times)), peak
