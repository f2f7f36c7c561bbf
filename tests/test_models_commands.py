"""`mixsd models ...` through the real CLI entry point, on tiny models and the embedded default."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from mixsd_jax import cli
from test_gguf import write_tiny_gguf


@pytest.fixture(autouse=True)
def models_commands_only(monkeypatch):
    """cli.main as shipped (parsing, `error:` lines, exit codes) with only our package registered,
    so these tests do not depend on the other packages' command modules."""
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("mixsd_jax.models.commands",))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(model_dir: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    path = model_dir / "model.safetensors"
    tensors = dict(load_file(str(path)))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_inspect_counts_parameters_like_transformers(capsys, tiny_qwen2_dir):
    import torch
    from transformers import AutoModelForCausalLM

    rc, out, _ = run(capsys, "models", "inspect", str(tiny_qwen2_dir), "--json")
    assert rc == 0
    info = json.loads(out)
    reference = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32)
    assert info["parameters"] == reference.num_parameters()
    config = reference.config
    assert (info["model_type"], info["architecture"]) == ("qwen2", "Qwen2ForCausalLM")
    assert (info["layers"], info["hidden_size"], info["heads"], info["kv_heads"], info["vocab_size"]) == (
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
        config.vocab_size,
    )
    assert info["tied_embeddings"] is False and info["dtype"] == "float32"

    rc, out, _ = run(capsys, "models", "inspect", str(tiny_qwen2_dir))
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert rc == 0 and lines["parameters"] == str(info["parameters"]) and lines["model_type"] == "qwen2"


def test_inspect_tied_model_counts_embeddings_once(capsys, tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    rc, out, _ = run(capsys, "models", "inspect", str(tiny_llama_dir), "--json")
    info = json.loads(out)
    assert rc == 0 and info["tied_embeddings"] is True
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    assert info["parameters"] == reference.num_parameters()


def test_unsupported_model_type_is_one_line(capsys, tiny_llama_dir, tmp_path):
    model = _copy_model(tiny_llama_dir, tmp_path / "m")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    for action in (["inspect", str(model)], ["export", str(model), str(tmp_path / "out")]):
        rc, _, err = run(capsys, "models", *action)
        assert rc == 2 and "unsupported model_type 'gpt2'" in _one_line_error(err)


def test_missing_tensor_is_one_line(capsys, tiny_llama_dir, tmp_path):
    model = _copy_model(tiny_llama_dir, tmp_path / "m")
    _edit_tensors(model, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    rc, _, err = run(capsys, "models", "export", str(model), str(tmp_path / "out"))
    assert rc == 2 and "model.layers.1.mlp.up_proj.weight" in _one_line_error(err)
    assert not (tmp_path / "out").exists()


def test_mis_shaped_tensor_is_one_line(capsys, tiny_llama_dir, tmp_path):
    model = _copy_model(tiny_llama_dir, tmp_path / "m")

    def cut(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = tensors["model.layers.0.self_attn.k_proj.weight"][:8]

    _edit_tensors(model, cut)
    rc, _, err = run(capsys, "models", "export", str(model), str(tmp_path / "out"))
    assert rc == 2 and "model.layers.0.self_attn.k_proj.weight" in _one_line_error(err)


def test_unknown_model_and_bad_gguf_are_one_line(capsys, tmp_path):
    rc, _, err = run(capsys, "models", "inspect", "no-such-model")
    assert rc == 2 and "model 'no-such-model'" in _one_line_error(err)
    rc, _, err = run(capsys, "models", "pull", "qwen3-8b")
    assert rc == 2 and "'qwen3-8b' (Qwen/Qwen3-8B) cannot be pulled" in _one_line_error(err)
    write_tiny_gguf(tmp_path / "q.gguf", architecture="qwen2")
    rc, _, err = run(capsys, "models", "convert", str(tmp_path / "q.gguf"), str(tmp_path / "out"))
    assert rc == 2 and "GGUF architecture 'qwen2' is not supported" in _one_line_error(err)


def test_convert_then_export_keeps_the_logits(capsys, tmp_path):
    write_tiny_gguf(tmp_path / "tiny.gguf", qtype="Q8_0")
    rc, out, _ = run(capsys, "models", "convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "hf"))
    assert rc == 0 and out.strip() == str(tmp_path / "hf")

    rc, out, _ = run(capsys, "models", "export", str(tmp_path / "hf"), str(tmp_path / "exported"))
    assert rc == 0 and out.strip().endswith("exported")
    exported = tmp_path / "exported"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (exported / name).is_file(), name
    ids = [1, 5, 9, 40, 2, 7]
    np.testing.assert_allclose(_hf_logits(exported, ids), _hf_logits(tmp_path / "hf", ids), atol=1e-6)


def test_export_refuses_to_replace_a_non_model_directory(capsys, tiny_llama_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    rc, _, err = run(capsys, "models", "export", str(tiny_llama_dir), str(precious))
    assert rc == 2 and "refusing to replace it" in _one_line_error(err)
    assert (precious / "notes.txt").read_text() == "keep me"
    rc, _, err = run(capsys, "models", "export", str(tiny_llama_dir), str(tiny_llama_dir))
    assert rc == 2 and "is the model's own directory" in _one_line_error(err)


@pytest.mark.slow
def test_pull_and_inspect_the_embedded_default(capsys, smollm2_dir):
    rc, out, _ = run(capsys, "models", "pull", "smollm2-135m-instruct")
    assert rc == 0 and out.strip() == str(smollm2_dir)
    rc, out, _ = run(capsys, "models", "inspect", "smollm2-135m-instruct", "--json")
    info = json.loads(out)
    assert rc == 0
    shape = (info["layers"], info["hidden_size"], info["heads"], info["kv_heads"], info["head_dim"])
    assert shape == (30, 576, 9, 3, 64)
    assert info["parameters"] == 134_515_008 and info["tied_embeddings"] is True and info["dtype"] == "float32"
