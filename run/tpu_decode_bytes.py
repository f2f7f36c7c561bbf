"""Decode on a TPU, checked by bytes: one decode step's HBM traffic by XLA:TPU's cost model.

  python run/tpu_decode_bytes.py [--model qwen3-8b] [--topology v5e:4x8] [--tensor 8] [--batch 8]

For one decode step of the engine (sampling/segments.py decode_segment, loop-scaled by
bench.estimates.decode_estimates) compiled for the slice, prints one JSON line per case and the
three ratios: MixSD step bytes over the ideal (weight shard + live KV rows read once), the same
live length in a 8,192-slot cache over a 64-slot one, and a MixSD step over a plain one.
Estimates from XLA:TPU's cost model, not measurements.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="qwen3-8b")
    parser.add_argument("--topology", default="v5e:4x8")
    parser.add_argument("--tensor", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="records (pairs) per step")
    parser.add_argument("--prompt-len", type=int, default=1808)
    parser.add_argument("--max-new-tokens", type=int, default=8192)
    args = parser.parse_args()

    from mixsd_jax.bench.estimates import decode_estimates
    from mixsd_jax.bench.kernels import DecodeShapes
    from mixsd_jax.bench.memory import model_config_for, tpu_target
    from mixsd_jax.models.sharding import MeshConfig, make_mesh, pad_rows

    target = tpu_target(args.topology, None)
    cfg = model_config_for(args.model)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=args.tensor), devices=target.devices)
    B = pad_rows(args.batch, mesh)
    live = args.prompt_len + args.max_new_tokens
    cases = {
        "mixsd": (DecodeShapes(B, 2, args.prompt_len, args.max_new_tokens, live), live),
        "plain": (DecodeShapes(B, 1, args.prompt_len, args.max_new_tokens, live), live),
        # 48 live tokens in a 64-slot cache and in an 8,192-slot one (64-slot blocks in both).
        "cap64": (DecodeShapes(B, 2, 16, 31, 64, block=64), 48),
        "cap8192": (DecodeShapes(B, 2, 16, 8192 - 16 - 17, 8192, block=64), 48),
    }
    out = {}
    for name, (shapes, at) in cases.items():
        est = decode_estimates(cfg, mesh, shapes, target, dtype="bfloat16", param_dtype="bfloat16", live=at)
        out[name] = est
        print(json.dumps({"case": name, "capacity": shapes.capacity, "batch": B, "sides": shapes.sides,
                          "mesh": dict(mesh.shape), "topology": args.topology, **est}), flush=True)
    print(json.dumps({
        "model": args.model, "topology": args.topology,
        "mixsd_bytes_over_ideal_est": out["mixsd"]["bytes_over_ideal_est"],
        "cap8192_over_cap64_est": round(out["cap8192"]["bytes_per_step_est"] / out["cap64"]["bytes_per_step_est"], 3),
        "mixsd_over_plain_est": round(out["mixsd"]["bytes_per_step_est"] / out["plain"]["bytes_per_step_est"], 3),
    }), flush=True)


if __name__ == "__main__":
    main()
