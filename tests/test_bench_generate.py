"""`mixsd bench generate`'s workloads on a tiny model: their JSON keys, and that each A/B pair does the same work."""

import json

from mixsd_jax.cli import main
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tokenizer import load_tokenizer
from mixsd_jax.bench import generate as bench
from mixsd_jax.sampling.engine import Engine, EngineSpec, decode_all
from mixsd_jax.sampling.strategies import Sampler
from mixsd_jax.sampling.work import WorkItem


def _ratio_keys(result, name):
    assert {name, f"{name}_min", f"{name}_max"} <= set(result)
    assert result[f"{name}_min"] <= result[name] <= result[f"{name}_max"]


def test_capacity_and_longtail_pairs_do_the_same_work(tiny_llama_dir, capsys):
    assert main(["bench", "generate", "--model", str(tiny_llama_dir), "--workload", "capacity", "--records", "4",
                 "--repeats", "1", "--mesh", "data=2,tensor=2", "--block", "16"]) == 0
    capacity = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert capacity["same_outputs"] and capacity["decode_steps"] <= 48
    assert capacity["mesh"] == {"data": 2, "fsdp": 1, "tensor": 2} and capacity["block"] == 16
    _ratio_keys(capacity, "capacity_ratio")
    assert {"load_avg", "cores"} <= set(capacity)

    longtail = bench.bench_generate(str(tiny_llama_dir), "longtail", batch_size=2, max_new_tokens=12, records=4,
                                    repeats=1)
    assert longtail["same_outputs"]  # continuous and fixed batches give the same files, retries included
    assert longtail["attempts"] == 4 * 3  # nothing passes on a random model: every record uses both retries
    _ratio_keys(longtail, "longtail_speedup")


def test_pytorch_two_cache_peer_is_the_same_mixsd_job(tiny_llama_dir):
    """At λ = 0 and 1 no coin decides, so the PyTorch loop must give our expert / naive greedy tokens."""
    cfg, params = load_hf(tiny_llama_dir)
    tok = load_tokenizer(tiny_llama_dir)
    expert, naive = bench._prompts(tok, bench._kgfact_records(3), "knowledge")
    peer = bench._TorchPeer(tiny_llama_dir, tok.pad_id, "float32")
    items = [WorkItem((e, n), i) for i, (e, n) in enumerate(zip(expert, naive))]
    for lam in (0.0, 1.0):
        engine = Engine(params, EngineSpec(cfg, Sampler(0.0), sides=2, max_new_tokens=10, max_model_len=4096,
                                           batch_size=3, naive_prob=lam))
        ours = [c.tokens for c in decode_all(engine, items)]
        assert peer.mix(expert, naive, 10, lam).tolist() == ours


def test_default_workload_reports_every_ratio(tiny_llama_dir):
    result = bench.bench_generate(str(tiny_llama_dir), "default", batch_size=2, max_new_tokens=20, repeats=1)
    for name in ("mix_step_over_plain_step", "mix_decode_step_over_plain_decode_step", "mix_over_torch_mix",
                 "mix_over_hf"):
        _ratio_keys(result, name)
    # PyTorch ran in both dtypes; its best is the faster one (per round, so at least the faster median).
    assert result["torch_dtypes"] == ["float32", "bfloat16"]
    for job in ("torch_mix", "hf"):
        per_dtype = [result[f"{job}_tokens_per_s_{d}"] for d in result["torch_dtypes"]]
        assert result[f"{job}_tokens_per_s"] >= max(per_dtype) > 0


def test_blocks_workload_interleaves_block_sizes(tiny_llama_dir, capsys):
    assert main(["bench", "generate", "--model", str(tiny_llama_dir), "--workload", "blocks", "--blocks", "8,16",
                 "--batch-size", "2", "--max-new-tokens", "6", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["blocks"] == [8, 16] and result["same_tokens_across_blocks"]  # the prompts span several blocks
    for name in ("mix_step_over_plain_step_b8", "mix_step_over_plain_step_b16", "mix_b16_over_mix_b8",
                 "plain_b16_over_plain_b8"):
        _ratio_keys(result, name)
    assert {"load_avg", "cores", "default_block"} <= set(result)
