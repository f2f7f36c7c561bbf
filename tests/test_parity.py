"""`mixsd models parity` (registered by `sampling`, since it checks our decoder too) through the
real CLI entry point, against transformers on tiny models."""

from __future__ import annotations

import json

import pytest

from mixsd_jax import cli


@pytest.fixture(autouse=True)
def models_and_sampling_commands(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", ("mixsd_jax.models.commands", "mixsd_jax.sampling.commands"))


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_parity_on_a_tiny_model(capsys, tiny_qwen3_dir):
    rc, out, _ = run(capsys, "models", "parity", str(tiny_qwen3_dir))
    result = json.loads(out.strip().splitlines()[-1])
    assert {"max_abs_logit_diff", "argmax_agreement", "greedy_tokens_equal"} <= set(result)
    assert rc == 0
    assert result["max_abs_logit_diff"] <= 1e-3 and result["argmax_agreement"] == 1.0 and result["greedy_tokens_equal"]


def test_parity_holds_a_prompt_past_the_window_to_the_references_own_spread(capsys, tiny_gemma3_dir):
    """Gemma 3 (window 16): the long prompt is checked apart, beside transformers' spread under
    correctly rounded RoPE tables, which a random tiny model barely amplifies."""
    from mixsd_jax.sampling.parity import parity_passed

    rc, out, _ = run(capsys, "models", "parity", str(tiny_gemma3_dir))
    result = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and parity_passed(result) and result["greedy_tokens"] == 32
    assert result["longest_prompt"] > 16 and result["long_prompt_logit_diff"] <= 1e-3
    assert 0 < result["long_prompt_rope_rounding_spread"] < 1e-3
    assert not parity_passed(result | {"long_prompt_logit_diff": 3 * result["long_prompt_rope_rounding_spread"] + 1e-3})


def test_parity_without_pytorch_is_one_line(tiny_llama_dir):
    """A plain `pip install -e .` has no PyTorch; the commands that compare with it say so."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None; from mixsd_jax.cli import main; "
            f"sys.exit(main(['models', 'parity', {str(tiny_llama_dir)!r}]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1] == (
        "error: this command compares against PyTorch; install it with the test extras: pip install -e '.[test]'")


def test_parity_against_a_gguf_needs_an_embedded_model(capsys, tiny_llama_dir):
    rc, _, err = run(capsys, "models", "parity", str(tiny_llama_dir), "--gguf")
    assert rc == 2 and "--gguf needs an embedded model" in _one_line_error(err)
