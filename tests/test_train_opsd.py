"""OPSD runs on a tiny model and a tiny KGFact corpus, through the one training loop: rollouts that
depend only on (seed, step, prompt, rollout), same-seed and kill/resume byte identity, 8 devices
against 1, the divergence going down on the training prompts, and clear errors for bad input.

Every run uses the same shapes (pad_to_max_len), so the step compiles once per mesh and teacher.
"""

import dataclasses
import json

import numpy as np
import pytest

from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.data.layout import KGFACT_TRAIN
from mixsd_jax.errors import MixsdError
from mixsd_jax.files import read_partial_jsonl
from mixsd_jax.train.checkpoints import Checkpoints
from mixsd_jax.train.config import load_train_config
from mixsd_jax.train.loop import train

STEPS = 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("kgfact")
    build_kgfact(out, preset="tiny", seed=0)
    return out / KGFACT_TRAIN  # 12 records: 3 steps per epoch at 4 prompts per step


def _cfg(model_dir, data, out, *extra):
    return load_train_config(
        None, [f"model={model_dir}", f"data={data}", f"out={out}", "method=opsd", f"steps={STEPS}", "batch_size=4",
               "lr=1e-3", "save_every=3", "max_seq_len=256", "pad_to_max_len=true", "seed=0",
               "async_checkpoints=false", "mesh.data=1", "opsd.num_rollouts=2", "opsd.max_new_tokens=16",
               "opsd.loss_chunk=8", *extra]
    )


def _losses(out):
    return [(r["step"], r["loss"], r["accuracy"], r["grad_norm"], r["tokens"], r["rollout_tokens"], r["teacher_tokens"])
            for r in read_partial_jsonl(out / "metrics.jsonl")]


def _weights(out):
    return (out / "hf" / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("opsd_straight")
    return out, train(_cfg(tiny_llama_dir, corpus, out), progress=False)


def _rollout_source(cfg):
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.tokenizer import load_tokenizer
    from mixsd_jax.train import opsd

    tokenizer = load_tokenizer(cfg.model)
    _, plan, prompts = opsd.prepare(cfg, tokenizer)
    return opsd.RolloutBatches(cfg, tokenizer, prompts, plan, ModelConfig.from_hf_dir(cfg.model), None)


def test_run_logs_divergence_and_rollouts(straight):
    out, summary = straight
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["steps"] == STEPS and summary["records"] == 12 and summary["steps_per_epoch"] == 3
    rows = read_partial_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        # 4 prompts x 2 rollouts of at most 16 tokens; the loss tokens are exactly the responses.
        assert 8 <= r["rollout_tokens"] <= 128 and r["loss_tokens"] == r["rollout_tokens"]
        assert r["loss"] > 0 and np.isfinite(r["grad_norm"]) and r["teacher_tokens"] > r["rollout_tokens"]
    assert sorted(Checkpoints(out / "checkpoints").all_steps()) == [3, 6]
    assert (out / "hf" / "model.safetensors").is_file()


def test_rollouts_depend_only_on_seed_step_prompt_and_rollout(tiny_llama_dir, corpus, tmp_path):
    from mixsd_jax.models.checkpoint import load_hf

    _, params = load_hf(tiny_llama_dir)
    cfg = _cfg(tiny_llama_dir, corpus, tmp_path)
    wide = _rollout_source(cfg).rollouts(2, params)
    narrow = _rollout_source(dataclasses.replace(cfg, opsd=dataclasses.replace(cfg.opsd, rollout_batch_size=3)))
    assert [(p.record_index, r) for p, r, _ in narrow.rollouts(2, params)] == [(p.record_index, r) for p, r, _ in wide]
    # A prompt's two rollouts differ (their own keys); another step draws other responses.
    assert wide[0][1] != wide[1][1]
    assert [r for _, r, _ in _rollout_source(cfg).rollouts(5, params)] != [r for _, r, _ in wide]
    # Greedy rollouts are one response per prompt whatever the rollout index.
    greedy = _rollout_source(dataclasses.replace(cfg, opsd=dataclasses.replace(cfg.opsd, temperature=0.0)))
    g = greedy.rollouts(2, params)
    assert g[0][1] == g[1][1]


def test_same_seed_same_losses_and_bitwise_weights(straight, tiny_llama_dir, corpus, tmp_path):
    out, _ = straight
    train(_cfg(tiny_llama_dir, corpus, tmp_path), progress=False)
    assert _losses(tmp_path) == _losses(out)
    assert _weights(tmp_path) == _weights(out)


def test_killed_run_resumes_byte_identically(straight, tiny_llama_dir, corpus, tmp_path):
    out, _ = straight

    def kill_after_step_4(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_llama_dir, corpus, tmp_path, "async_checkpoints=true"), progress=False, on_step=kill_after_step_4)
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == [3]
    summary = train(_cfg(tiny_llama_dir, corpus, tmp_path), progress=False)
    assert summary["start_step"] == 3 and summary["steps_this_run"] == 3
    assert _losses(tmp_path) == _losses(out)  # the same rollouts from the restored parameters
    assert _weights(tmp_path) == _weights(out)


def test_eight_devices_agree_with_one(straight, tiny_llama_dir, corpus, tmp_path):
    out, _ = straight
    train(_cfg(tiny_llama_dir, corpus, tmp_path, "mesh.data=-1"), progress=False)
    assert json.loads((tmp_path / "summary.json").read_text())["devices"] == 8
    one, eight = _losses(out), _losses(tmp_path)
    assert [r[5] for r in eight] == [r[5] for r in one]  # the same rollout lengths
    np.testing.assert_allclose(np.array(eight, float), np.array(one, float), rtol=1e-5)
    from mixsd_jax.models.checkpoint import read_hf_tensors

    a = {k: np.asarray(v) for k, v in read_hf_tensors(out / "hf").items()}
    b = {k: np.asarray(v) for k, v in read_hf_tensors(tmp_path / "hf").items()}
    for name in a:
        # Relative to each tensor's norm: AdamW turns a last-bit difference in a near-zero gradient
        # into an lr-sized step for a handful of elements (4 of 24,576 here, 1e-5 absolute).
        assert np.linalg.norm(b[name] - a[name]) <= 1e-5 * np.linalg.norm(a[name]), name


def test_opsd_lowers_the_divergence_on_its_training_prompts(straight, tiny_llama_dir, corpus, tmp_path):
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.train import opsd

    out, _ = straight
    cfg = _cfg(tiny_llama_dir, corpus, tmp_path, "batch_size=12", "opsd.num_rollouts=1")  # every prompt once
    _, base = load_hf(tiny_llama_dir)
    _, tuned = load_hf(out / "hf")
    model_cfg = ModelConfig.from_hf_dir(tiny_llama_dir)
    loss = opsd.loss_for(cfg)
    before, n = opsd.mean_divergence(base, base, model_cfg, _rollout_source(cfg).host_batch(0, base), loss)
    after, m = opsd.mean_divergence(tuned, base, model_cfg, _rollout_source(cfg).host_batch(0, tuned), loss)
    assert n > 0 and m > 0
    assert after < 0.75 * before, (before, after)  # 0.106 -> 0.064 when written


def test_live_teacher_runs_and_differs(straight, tiny_llama_dir, corpus, tmp_path):
    out, _ = straight
    train(_cfg(tiny_llama_dir, corpus, tmp_path, "opsd.teacher=live", "steps=2"), progress=False)
    live = _losses(tmp_path)
    assert live[0] == _losses(out)[0]  # step 1: the live student still equals the base
    assert live[1][1] != _losses(out)[1][1]


def test_bad_input_is_one_clear_line(tiny_llama_dir, corpus, tmp_path):
    with pytest.raises(MixsdError, match="config key 'opsd.divergence': unknown divergence 'jsd'"):
        _cfg(tiny_llama_dir, corpus, tmp_path, "opsd.divergence=jsd")
    no_clear = tmp_path / "no_clear.jsonl"
    no_clear.write_text(json.dumps({"messages": [{"role": "user", "content": "Q?"},
                                                 {"role": "assistant", "content": "A."}]}) + "\n")
    with pytest.raises(MixsdError, match=r"no_clear\.jsonl: record 1: clear_answer: .* needs a clear_answer"):
        train(_cfg(tiny_llama_dir, no_clear, tmp_path / "a", "opsd.prompt=only_correct_answer"), progress=False)
    no_gt = tmp_path / "no_gt.jsonl"
    no_gt.write_text(json.dumps({"messages": [{"role": "user", "content": "Q?"}]}) + "\n")
    with pytest.raises(MixsdError, match=r"no_gt\.jsonl:1: messages"):
        train(_cfg(tiny_llama_dir, no_gt, tmp_path / "b"), progress=False)
    # The prompts (81-92 tokens) fit in 96, but not with a response and a cut ground truth.
    with pytest.raises(MixsdError, match=r"the OPSD teacher input cannot fit: all 12 prompts leave no room .* "
                                         r"max_seq_len=96; raise max_seq_len"):
        train(_cfg(tiny_llama_dir, corpus, tmp_path / "c", "max_seq_len=96"), progress=False)


def test_rollouts_to_the_length_limit_get_the_ground_truth_cut(tiny_llama_dir, corpus, tmp_path):
    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.train import opsd
    from mixsd_jax.train.teacher import OMISSION_MARKER

    cfg = _cfg(tiny_llama_dir, corpus, tmp_path, "max_seq_len=200", "opsd.max_new_tokens=200")
    source = _rollout_source(cfg)
    limit = opsd.rollout_limit(cfg, source.tokenizer)
    _, params = load_hf(tiny_llama_dir)
    rolled = source.rollouts(0, params)
    assert any(reason == "max_model_len" for _, _, reason in rolled)
    assert all(len(p.ids) + len(r) <= limit for p, r, _ in rolled)
    batch = source.host_batch(0, params)
    assert batch["teacher_segment_ids"].shape[-1] == 200 and batch["teacher_segment_ids"].sum(-1).max() <= 199
    cut = [t for t in batch["teacher_tokens"].reshape(-1, 200)
           if OMISSION_MARKER in source.tokenizer.decode(t.tolist(), skip_special_tokens=False)]
    assert cut  # the long rollouts' teachers got the 60/40 cut instead of stopping the run
