"""MoE parity table: tiny random DeepSeek-V3-style, Qwen3-MoE and Qwen2-MoE checkpoints (transformers' PyTorch
models, float32, eager) against arm_jax's expert-parallel layer on 1 device and on 8 devices with expert axes of 2
and 4: max |logits - transformers| over real tokens, max |token log-prob - one device's|, and whether greedy
tokens equal transformers' `generate`.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.moe_parity \
      --out experiments/results/moe_parity.json
"""

from __future__ import annotations

import argparse
import tempfile

import jax
import numpy as np

import arm_jax as aj
from experiments.bench_common import report
from tests import hf_models
from tests.rollout.test_sampler import PROMPTS, _hf_greedy

KINDS = ("deepseek_v3", "qwen3_moe", "qwen2_moe")
MESHES = ((1, 1, 1), (1, 4, 1, 2), (1, 2, 1, 4), (2, 1, 2, 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="moe_parity.json")
    args = ap.parse_args()
    rows = []
    for kind in KINDS:
        model = hf_models.build(kind)
        folder = tempfile.mkdtemp()
        model.save_pretrained(folder)
        greedy_ref = _hf_greedy(model, PROMPTS, 8, eos=None)
        single_lp = None
        for shape in MESHES:
            mesh = aj.make_mesh(shape, devices=jax.devices()[:int(np.prod(shape))])
            policy = aj.load_policy(folder, mesh=mesh)
            tokens, mask = hf_models.padded_batch(policy.config.vocab_size, lengths=(12, 7, 12, 3, 9, 12, 12, 5))
            ref = hf_models.reference_logits(model, tokens, mask)
            logits = np.asarray(aj.forward_logits(policy, tokens, mask))
            lp = np.asarray(aj.token_logprobs(policy, tokens, mask)[0])
            single_lp = lp if single_lp is None else single_lp
            greedy = aj.generate(policy, PROMPTS, max_new_tokens=8, temperature=0.0, stop_ids=[]).tokens
            rows.append({"model": kind, "mesh (data, fsdp, tensor, expert)": str(shape),
                         "expert axis": shape[3] if len(shape) == 4 else 1,
                         "max |logits - transformers|": float(np.max(np.abs(logits - ref) * mask[..., None])),
                         "max |logp - 1 device|": float(np.max(np.abs(lp - single_lp) * mask)),
                         "greedy == transformers": bool(np.array_equal(greedy, greedy_ref))})
    report(f"MoE parity on {jax.device_count()} {jax.devices()[0].device_kind} devices (float32, tiny random "
           f"checkpoints, expert-parallel layer)", rows, args.out)


if __name__ == "__main__":
    main()
