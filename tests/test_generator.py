"""`mixsd generate` end to end on a tiny model: schema, determinism, resume, refusal, bad input."""

import json

import pytest

from mixsd_jax import config as config_lib
from mixsd_jax.cli import main
from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.errors import MixsdError
from mixsd_jax.sampling import generator as gen_lib
from mixsd_jax.sampling.generator import GenerateConfig, Paths, generate
from mixsd_jax.sampling import segments

REFERENCE_META = (
    "lambda", "temperature", "topk", "num_generations_per_query", "gen_index", "student_token_fraction",
    "num_tokens", "finish_reason", "correct", "num_attempts", "max_retries", "extract_mode", "ground_truth_assistant",
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("kg")
    build_kgfact(root, preset="tiny", seed=0)
    return root / "atomic_sft" / "train_messages.jsonl"


def _cfg(corpus, model, out, **kw):
    base = dict(input=str(corpus), out_dir=str(out), model=str(model), lambda_mix=0.5, temperature=0.8,
                max_new_tokens=6, max_retries=1, batch_size=8, keep_rejected=True, num_generations=2, limit=5,
                mesh={"data": 1})
    base.update(kw)
    return config_lib.from_dict(GenerateConfig, base)


def test_output_schema_and_summary(corpus, tiny_llama_dir, tmp_path):
    summary = generate(_cfg(corpus, tiny_llama_dir, tmp_path, keep_rejected=False), progress=False)
    paths = Paths.for_config(_cfg(corpus, tiny_llama_dir, tmp_path))
    slug = gen_lib.model_slug(str(tiny_llama_dir))
    assert paths.final.name == f"train_messages_mix_{slug}_l0p5_t0p8_n2_topk64.jsonl"
    assert not paths.partial.exists() and not paths.meta.exists()
    rejected = [json.loads(line) for line in paths.rejected.read_text().splitlines()]
    accepted = [json.loads(line) for line in paths.final.read_text().splitlines()]
    assert len(accepted) + len(rejected) == 10 == summary["generations"]
    assert summary["accepted"] == len(accepted) and summary["rejected"] == len(rejected)
    for row in rejected + accepted:
        meta = row["mix_meta"]
        assert set(REFERENCE_META) <= set(meta)
        assert {"seed", "model", "prompt_preset", "fingerprint"} <= set(meta)
        assert row["messages"][0]["role"] == "user" and row["messages"][1]["role"] == "assistant"
        assert meta["num_attempts"] == 2 or meta["correct"]  # max_retries=1 -> at most 2 attempts
        assert meta["num_tokens"] == 6 or meta["finish_reason"] == "stop"
    # Input order: (record, generation).
    keys = [(r["mix_meta"]["record_index"], r["mix_meta"]["gen_index"]) for r in rejected]
    assert keys == sorted(keys)
    assert 0.0 < summary["mean_naive_token_fraction"] < 1.0


def _final_bytes(corpus, model, out, **kw):
    cfg = _cfg(corpus, model, out, **kw)
    generate(cfg, progress=False)
    return Paths.for_config(cfg).final.read_bytes()


def test_same_bytes_across_batch_sizes(corpus, tiny_qwen2_dir, tmp_path):
    reference = _final_bytes(corpus, tiny_qwen2_dir, tmp_path / "b8", batch_size=8)
    assert _final_bytes(corpus, tiny_qwen2_dir, tmp_path / "b1", batch_size=1) == reference
    assert _final_bytes(corpus, tiny_qwen2_dir, tmp_path / "b3", batch_size=3) == reference
    assert _final_bytes(corpus, tiny_qwen2_dir, tmp_path / "seed", batch_size=8, seed=1) != reference


def test_same_bytes_on_8_devices(corpus, tiny_qwen2_dir, tmp_path):
    one = _final_bytes(corpus, tiny_qwen2_dir, tmp_path / "one", batch_size=8)
    assert _final_bytes(corpus, tiny_qwen2_dir, tmp_path / "eight", batch_size=8, mesh={"data": 8}) == one


def test_killed_run_resumes_to_identical_file(corpus, tiny_qwen2_dir, tmp_path, monkeypatch):
    reference = _final_bytes(corpus, tiny_qwen2_dir, tmp_path / "straight", batch_size=3)
    calls = {"n": 0}
    original = segments.decode_segment

    def dying_segment(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # by then retries have finished and been streamed (3 slots, 10 attempts)
            raise KeyboardInterrupt  # killed between decode segments
        return original(*args, **kwargs)

    cfg = _cfg(corpus, tiny_qwen2_dir, tmp_path / "killed", batch_size=3)
    monkeypatch.setattr(segments, "decode_segment", dying_segment)
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, progress=False)
    paths = Paths.for_config(cfg)
    assert paths.partial.exists() and not paths.final.exists()
    assert paths.partial.read_text().count("\n") > 0  # some results were streamed before the kill
    with open(paths.partial, "a") as f:
        f.write('{"messages": [{"role": "user", "cont')  # torn by the kill mid-write
    monkeypatch.setattr(segments, "decode_segment", original)
    summary = generate(cfg, progress=False)
    assert paths.final.read_bytes() == reference
    assert summary["this_run"]["tokens_generated"] > 0
    # A finished run with the same settings is not redone.
    assert generate(cfg, progress=False)["skipped_existing"]


def test_partial_from_other_settings_is_refused(corpus, tiny_llama_dir, tmp_path, monkeypatch):
    cfg = _cfg(corpus, tiny_llama_dir, tmp_path)
    monkeypatch.setattr(gen_lib, "_run_queue", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        generate(cfg, progress=False)
    other = _cfg(corpus, tiny_llama_dir, tmp_path, max_retries=3)  # same file name, other settings
    with pytest.raises(MixsdError, match="partial output from different settings"):
        generate(other, progress=False)


def test_prompt_too_long_and_missing_gt_answers_are_counted(corpus, tiny_llama_dir, tmp_path):
    records = [json.loads(line) for line in corpus.read_text().splitlines()][:3]
    records[1]["messages"][1]["content"] = "The answer is hidden."  # no \boxed{}: never verifiable
    records[2]["messages"][0]["content"] = "word " * 400  # longer than max_model_len
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = generate(_cfg(src, tiny_llama_dir, tmp_path / "out", num_generations=1, max_model_len=300,
                            keep_rejected=False), progress=False)
    assert summary["no_gt_answer"] == 1 and summary["prompt_too_long"] == 1
    assert summary["generations"] == 3


def test_keep_rejected_never_writes_an_empty_answer_into_the_training_file(corpus, tiny_llama_dir, tmp_path):
    """Failed answers are kept for training, but the empty ones (here: no ground truth and a prompt
    too long) stay in the rejected file, counted: the training reader refuses an empty answer."""
    from mixsd_jax.data.records import read_records

    records = [json.loads(line) for line in corpus.read_text().splitlines()][:4]
    records[1]["messages"][1]["content"] = "The answer is hidden."
    records[2]["messages"][0]["content"] = "word " * 400
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = _cfg(src, tiny_llama_dir, tmp_path / "out", num_generations=1, max_model_len=300, keep_rejected=True)
    summary = generate(cfg, progress=False)
    paths = Paths.for_config(cfg)
    kept = read_records(paths.final)  # the training reader's rules: no empty answer
    empty = [json.loads(line) for line in paths.rejected.read_text().splitlines()]
    assert summary["empty_answers"] == 2 == len(empty)
    assert sorted(r["mix_meta"]["finish_reason"] for r in empty) == ["no_gt_answer", "prompt_too_long"]
    assert len(kept) == summary["generations"] - 2 == 2
    assert all(r.assistant.strip() for r in kept)


@pytest.mark.parametrize(
    "override, message",
    [
        ("lambda_mix=1.5", "'lambda_mix': 1.5 is outside"),
        ("temperature=-1", "'temperature': -1.0 is outside"),
        ("topk=0", "'topk': 0 is outside"),
        ("extract_mode=fuzzy", "unknown extract_mode 'fuzzy'"),
    ],
)
def test_bad_settings_exit_with_one_line(corpus, tiny_llama_dir, tmp_path, capsys, override, message):
    rc = main(["generate", "--input", str(corpus), "--model", str(tiny_llama_dir), "--out", str(tmp_path), override])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_bad_input_files(tiny_llama_dir, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(["generate", "--input", str(empty), "--model", str(tiny_llama_dir), "--out", str(tmp_path)]) == 2
    assert "no records" in capsys.readouterr().err
    no_answer = tmp_path / "user_only.jsonl"
    no_answer.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["generate", "--input", str(no_answer), "--model", str(tiny_llama_dir), "--out", str(tmp_path)]) == 2
    assert "user_only.jsonl:1" in capsys.readouterr().err
