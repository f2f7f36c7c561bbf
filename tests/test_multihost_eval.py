"""Evaluation on the mesh: `mixsd eval` on two local processes writes the per-item rows of one
process (MC log-likelihoods within 1e-5, decoded texts equal), and `dtype=bfloat16` really computes
in bf16 (log-likelihoods off f32 by more than round-off, within bf16 tolerance)."""

import json
from pathlib import Path

import numpy as np
import pytest

import multihost_helpers as mh
from mixsd_jax.eval.runner import EvalConfig, evaluate
from mixsd_jax.models.sharding import MeshConfig

# piqa: choices after a shared context; winogrande: one continuation after several contexts;
# gsm8k: greedy decoding. Two items each.
BENCHMARKS = ("piqa", "winogrande", "gsm8k")


def _rows(out: Path, checkpoint: str = "base") -> dict:
    return {p.stem: [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((out / "items" / checkpoint).glob("*.jsonl"))}


def _config(model_dir, out, **overrides) -> EvalConfig:
    settings = dict(base=str(model_dir), suites=("retention",), benchmarks=BENCHMARKS, limit=2, out_dir=str(out),
                    batch_size=2, max_new_tokens=6, mesh=MeshConfig(data=1))
    settings.update(overrides)
    return EvalConfig(**settings)


@pytest.fixture(scope="module")
def analyses(tmp_path_factory) -> dict:
    """A tuned checkpoint and a training file: the NLL, KL and Fisher suites run too."""
    from mixsd_jax.models.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("eval_inputs")
    train = root / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Which is item {i}?"},
                                                      {"role": "assistant", "content": f"Item {i} is \\boxed{{{i}}}."}]})
                             + "\n" for i in range(3)))
    return {"tuned": f"t1={write_tiny_model(root / 'tuned', 'llama', seed=1)}", "train": f"gt={train}"}


@pytest.fixture(scope="module")
def one_process(tiny_llama_dir, analyses, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("eval_one")
    evaluate(_config(tiny_llama_dir, out, tuned=(analyses["tuned"],), train_files=(analyses["train"],),
                     suites=("retention", "nll", "kl", "fisher"), kl_texts=2, fisher_texts=1), progress=False)
    return {**_rows(out), **{f"t1/{k}": v for k, v in _rows(out, "t1").items()}}


def test_two_processes_write_the_rows_of_one(tiny_llama_dir, analyses, one_process, tmp_path):
    out = tmp_path / "two"
    mh.run(["eval", "--base", str(tiny_llama_dir), "--suite", "retention,nll,kl,fisher", "--benchmarks",
            ",".join(BENCHMARKS), "--limit", "2", "--out", str(out), "--batch-size", "2", "--max-new-tokens", "6",
            "--quiet", "--tuned", analyses["tuned"], "--train-file", analyses["train"], "kl_texts=2", "fisher_texts=1"])
    two = {**_rows(out), **{f"t1/{k}": v for k, v in _rows(out, "t1").items()}}
    expected = {f"retention.{b}" for b in BENCHMARKS} | {"nll.gt", "t1/kl", "t1/fisher"}
    assert set(two) == set(one_process) and expected <= set(two)
    for unit, rows in one_process.items():
        assert len(two[unit]) == len(rows)
        for a, b in zip(rows, two[unit]):
            assert a.get("id") == b.get("id")
            if "logprobs" in a:  # MC
                np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-5, err_msg=unit)
            elif "response" in a:  # decoded
                assert a["response"] == b["response"], unit
            elif "nll" in a:
                np.testing.assert_allclose(a["nll"], b["nll"], atol=1e-5, err_msg=unit)
            elif "kl_mean" in a:
                np.testing.assert_allclose([a["kl_mean"], a["kl_last"]], [b["kl_mean"], b["kl_last"]], atol=1e-5)
            else:  # fisher
                np.testing.assert_allclose(a["fisher_displacement"], b["fisher_displacement"], rtol=1e-5)
    assert (out / "results.json").is_file() and (out / "report.md").is_file()
    assert not list(out.rglob(".*.tmp"))  # one writer: no temporary file of a second one left behind


def test_bfloat16_eval_computes_in_bfloat16(tiny_llama_dir, one_process, tmp_path):
    evaluate(_config(tiny_llama_dir, tmp_path / "bf16", benchmarks=("piqa", "winogrande"), dtype="bfloat16"),
             progress=False)  # base only: the retention rows
    bf16 = _rows(tmp_path / "bf16")
    f32 = np.concatenate([np.ravel([r["logprobs"] for r in one_process[u]]) for u in sorted(bf16)])
    ours = np.concatenate([np.ravel([r["logprobs"] for r in bf16[u]]) for u in sorted(bf16)])
    assert np.max(np.abs(ours - f32)) > 1e-4  # more than f32 round-off: the compute dtype is used
    np.testing.assert_allclose(ours, f32, rtol=0.05, atol=0.05)  # but within bf16 precision


def test_bfloat16_parameters_are_loaded_in_bfloat16(tiny_llama_dir, one_process, tmp_path):
    from mixsd_jax.eval.checkpoints import Checkpoint
    from mixsd_jax.eval.model_cache import Models

    cfg = _config(tiny_llama_dir, tmp_path / "p16", benchmarks=("piqa",), param_dtype="bfloat16")
    models = Models(cfg, Checkpoint("base", "base", str(tiny_llama_dir), tiny_llama_dir))
    assert models.params["layers"]["wq"].dtype == np.dtype("bfloat16")
    evaluate(cfg, progress=False)
    rows = _rows(tmp_path / "p16")["retention.piqa"]
    diff = np.abs(np.ravel([r["logprobs"] for r in rows]) - np.ravel([r["logprobs"] for r in one_process["retention.piqa"]]))
    assert 1e-4 < diff.max() < 0.5


def test_tensor_parallel_eval_gives_the_rows_of_one_device(tiny_llama_dir, one_process, tmp_path):
    """Parameters over `tensor` (a model larger than one chip), items over `data`: same rows."""
    out = tmp_path / "tp"
    evaluate(_config(tiny_llama_dir, out, mesh=MeshConfig(data=2, tensor=4)), progress=False)
    tp = _rows(out)
    assert set(tp) == {f"retention.{b}" for b in BENCHMARKS}
    for unit in tp:
        for a, b in zip(one_process[unit], tp[unit], strict=True):
            if "logprobs" in a:
                np.testing.assert_allclose(a["logprobs"], b["logprobs"], atol=1e-4, err_msg=unit)
            else:
                assert a["response"] == b["response"], unit
