"""Benchmark helpers: the synthetic batch and the FLOP count used for MFU."""

import numpy as np
import torch

from mixsd_jax.models.config import ModelConfig
from mixsd_jax.bench.train import synthetic_batch
from mixsd_jax.train.step import flops_per_token


def test_synthetic_batch_trains_every_next_token():
    batch = synthetic_batch(vocab_size=50, batch_size=2, seq_len=5)
    assert batch["tokens"].shape == (1, 2, 5) and batch["loss_mask"].all() and (batch["segment_ids"] == 1).all()
    np.testing.assert_array_equal(batch["tokens"][0, :, 1:], batch["targets"][0, :, :-1])
    np.testing.assert_array_equal(batch["positions"][0, 1], np.arange(5))
    assert batch["tokens"].max() < 50


def test_flops_per_token_counts_every_matmul_weight(tiny_qwen3_dir):
    """6 FLOPs per weight of every linear layer (LM head included), plus attention scores and
    values: 2 matmuls x 2 FLOPs x T keys per query dimension, forward and two backward passes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_qwen3_dir, dtype=torch.float32)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    cfg = ModelConfig.from_hf_dir(tiny_qwen3_dir)
    T = 128
    expected = 6 * linear + 3 * 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * T
    assert flops_per_token(cfg, T) == expected


def test_step_matmuls_are_the_weight_flops_of_the_step(tiny_qwen3_dir):
    """The plain-matmul reference of `mixsd bench train` times the step's own weight matmuls: three
    passes (forward, two backward) over them are the step's FLOPs less attention."""
    from mixsd_jax.bench.train import step_matmuls

    cfg = ModelConfig.from_hf_dir(tiny_qwen3_dir)
    T, tokens = 128, 4 * 128
    weight_flops = sum(2 * n * k * m * count for (n, k, m), count in step_matmuls(cfg, tokens))
    attention = 3 * 4 * cfg.num_layers * cfg.q_dim * T
    assert 3 * weight_flops == (flops_per_token(cfg, T) - attention) * tokens


def test_machine_report_judges_the_load_before_the_timed_work():
    import os

    from mixsd_jax.bench import machine

    idle = machine.report([0.0, 0.0, 0.0])
    assert idle["cores"] == len(os.sched_getaffinity(0)) and len(idle["load_avg"]) == 3 and "busy" not in idle
    busy = machine.report([idle["cores"] * 0.5 + 0.01, 0.0, 0.0])
    assert busy["load_avg_before"][0] > busy["cores"] / 2 and "before the timed work" in busy["busy"]


def test_compare_interleaves_both_dtypes_of_both_sides(tiny_qwen3_dir):
    """`bench train --compare`: ours in f32 and bf16, PyTorch in f32 and bf16 autocast, one timed
    step of each per round; the ratio is our best side over PyTorch's best, per round."""
    from mixsd_jax.bench.train import compare_train

    line = compare_train(str(tiny_qwen3_dir), batch_size=8, seq_len=16, rounds=2, compute_dtype="bfloat16")
    assert set(line["sides"]) == {"ours_float32", "ours_bfloat16", "torch_float32", "torch_bfloat16"}
    assert all(len(side["step_s"]) == 2 for side in line["sides"].values())
    best, theirs = line["sides"][line["ours_best"]], line["sides"][line["torch_best"]]
    assert best["tokens_per_s"] == max(line["sides"][s]["tokens_per_s"] for s in ("ours_float32", "ours_bfloat16"))
    assert line["ratio"]["min"] <= line["ratio"]["median"] <= line["ratio"]["max"]
    assert line["ratio"]["min"] <= best["tokens_per_s_max"] / theirs["tokens_per_s_min"]
    assert line["cpu_model"] and len(line["load_avg_before"]) == 3 and "ours_bfloat16_over_ours_float32" in line
