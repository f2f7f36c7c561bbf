"""`mixsd bench generate`: MixSD mixing vs our plain decode vs transformers' `generate`, one run.

Every row decodes exactly `max_new_tokens` (no stop tokens) so all three do the same work. Our two
kernels are compiled by a warm-up call before timing; transformers runs eager PyTorch.
With `mesh` (e.g. tensor=4) our kernels run on that mesh: records over data x fsdp, parameters and
KV heads over `tensor`, on every process of a multi-host run (process count, devices and the
machine's load are in the JSON line, so a figure taken on a busy machine says so).
"""

from __future__ import annotations

import tempfile
import time


def _bench_records(n: int):
    from mixsd_jax.data.kgfact import build_kgfact
    from mixsd_jax.data.records import read_records

    with tempfile.TemporaryDirectory() as tmp:
        build_kgfact(tmp, preset="small", seed=0)
        records = read_records(f"{tmp}/atomic_sft/train_messages.jsonl")
    return [records[i % len(records)] for i in range(n)]


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_generate(model: str, batch_size: int, max_new_tokens: int, lambda_mix: float = 0.3, dtype: str = "float32",
                   with_hf: bool = True, mesh_cfg=None, param_dtype: str = "float32") -> dict:
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.sampling.presets import expert_user_text, get_preset
    from mixsd_jax.sampling.runner import Runner, WorkItem
    from mixsd_jax.sampling.strategies import Sampler

    import os

    import jax

    from mixsd_jax.models.sharding import make_mesh

    model_dir = resolve_model(model)
    mesh = None if mesh_cfg is None else make_mesh(mesh_cfg)
    cfg, params = load_hf(model_dir, param_dtype, mesh=mesh)
    tok = load_tokenizer(model_dir)
    preset = get_preset("knowledge")
    records = _bench_records(batch_size)
    naive = [tuple(tok.prompt_ids(r.user)) for r in records]
    expert = [tuple(tok.prompt_ids(expert_user_text(r.user, r.assistant, preset))) for r in records]
    common = dict(sampler=Sampler(0.0), stop_ids=[], max_new_tokens=max_new_tokens, max_model_len=1 << 20,
                  batch_size=batch_size, seed=0, dtype=dtype, mesh=mesh)
    mix = Runner(params, cfg, sides=2, naive_prob=lambda_mix, **common)
    plain = Runner(params, cfg, sides=1, **common)
    mix_items = [WorkItem((e, n), i) for i, (e, n) in enumerate(zip(expert, naive))]
    plain_items = [WorkItem((n,), i) for i, n in enumerate(naive)]
    compile_s = _timed(lambda: mix.run(mix_items)) + _timed(lambda: plain.run(plain_items))
    mix_s = _timed(lambda: mix.run(mix_items))
    plain_s = _timed(lambda: plain.run(plain_items))
    tokens = batch_size * max_new_tokens
    result = {
        "model": model,
        "batch_size": batch_size,
        "max_new_tokens": max_new_tokens,
        "lambda": lambda_mix,
        "dtype": dtype,
        "mean_expert_prompt_tokens": sum(map(len, expert)) / batch_size,
        "mean_naive_prompt_tokens": sum(map(len, naive)) / batch_size,
        "mix_tokens_per_s": round(tokens / mix_s, 2),
        "plain_tokens_per_s": round(tokens / plain_s, 2),
        "mix_step_ms": round(1000 * mix_s / max_new_tokens, 2),
        "plain_step_ms": round(1000 * plain_s / max_new_tokens, 2),
        "mix_step_over_plain_step": round(mix_s / plain_s, 3),
        "compile_and_warmup_s": round(compile_s, 2),
        "param_dtype": param_dtype,
        "mesh": None if mesh is None else dict(mesh.shape),
        "processes": jax.process_count(),
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "cpu_cores": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2),
    }
    if with_hf:
        hf_s = _hf_generate_seconds(model_dir, tok, naive, max_new_tokens)
        result["hf_tokens_per_s"] = round(tokens / hf_s, 2)
        result["mix_over_hf"] = round(result["mix_tokens_per_s"] / result["hf_tokens_per_s"], 3)
    return result


def _hf_generate_seconds(model_dir, tok, prompts, max_new_tokens) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    width = max(map(len, prompts))
    pad = tok.pad_id
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kwargs = dict(attention_mask=mask, do_sample=False, pad_token_id=pad, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids[:, -8:], attention_mask=mask[:, -8:], max_new_tokens=2, min_new_tokens=2, do_sample=False,
                       pad_token_id=pad, eos_token_id=None)  # warm-up
        return _timed(lambda: model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, **kwargs))
