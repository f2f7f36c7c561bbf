"""`mixsd edit --method memit`: an HF model out, and bad input as one line with exit 2."""

import json

import pytest

from mixsd_jax.cli import main
from mixsd_jax.models.checkpoint import load_hf


def _facts(path, subject="the person"):
    record = {"messages": [{"role": "user", "content": "What profession does the person train?"},
                           {"role": "assistant", "content": "The answer is 42.\n\n\\boxed{42}"}]}
    if subject is not None:
        record["subject"] = subject
    path.write_text(json.dumps(record) + "\n")
    return path


def test_edit_writes_an_hf_model_and_a_summary(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(["edit", "--method", "memit", "--data", str(_facts(tmp_path / "f.jsonl")), "--model",
                 str(tiny_llama_dir), "--out", str(out), "v_steps=3", "stats_tokens=500", "stats_seq_len=64"])
    assert code == 0
    printed = capsys.readouterr()
    assert "edited 1 facts into layers [0, 1]" in printed.out
    # The long parts show progress: the statistics pass and the target values (1 of 1 facts).
    assert "memit second moments" in printed.err and "memit target values" in printed.err and "1/1" in printed.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == [0, 1] and summary["requests"] == 1 and summary["update_rank"] == {"0": 1, "1": 1}
    cfg, params = load_hf(out / "hf")
    _, base = load_hf(tiny_llama_dir)
    assert cfg.num_layers == 2 and (out / "hf" / "tokenizer.json").is_file()
    assert not (params["layers"]["w_down"] == base["layers"]["w_down"]).all()
    assert (params["layers"]["w_up"] == base["layers"]["w_up"]).all()
    request = json.loads((out / "requests.jsonl").read_text())
    assert request["prompt"].startswith("<|im_start|>user\nWhat profession does {} train?")


@pytest.mark.parametrize("subject, extra, message", [
    (None, [], "f.jsonl:1: subject: missing"),
    ("Somebody", [], "f.jsonl:1: subject: 'Somebody' does not occur in the prompt"),
    ("the person", ["layers=[0, 5]"], "config key 'layers': layer 5 is out of range for a 2-layer model (0..1)"),
    ("the person", ["v_lr=-1"], "config key 'v_lr'"),
])
def test_bad_input_is_one_line_and_exit_2(tiny_llama_dir, tmp_path, capsys, subject, extra, message):
    code = main(["edit", "--method", "memit", "--data", str(_facts(tmp_path / "f.jsonl", subject)), "--model",
                 str(tiny_llama_dir), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_a_family_without_memit_support_is_exit_2(tiny_llama_dir, tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    hf = json.loads((tiny_llama_dir / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**hf, "model_type": "gpt2"}))
    code = main(["edit", "--method", "memit", "--data", str(_facts(tmp_path / "f.jsonl")), "--model", str(model),
                 "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "unsupported model_type 'gpt2'" in err and err.count("\n") == 1
