"""`mixsd train` from the command line."""

import json

from mixsd_jax.cli import main
from mixsd_jax.data.kgfact import build_kgfact
from mixsd_jax.data.layout import KGFACT_TRAIN


def test_train_then_export_from_the_command_line(tiny_llama_dir, tmp_path, capsys):
    build_kgfact(tmp_path / "kg", preset="tiny", seed=0)
    config = tmp_path / "train.yaml"
    config.write_text("lr: 1.0e-2\nbatch_size: 4\nmax_seq_len: 160\npad_to_max_len: true\nsteps: 5\n")
    out = tmp_path / "run"
    argv = ["train", "--config", str(config), "--data", str(tmp_path / "kg" / KGFACT_TRAIN), "--model", str(tiny_llama_dir),
            "--out", str(out), "--steps", "2", "--batch-size", "8", "--seed", "0", "--no-progress",
            "async_checkpoints=false", "mesh.data=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "trained 2 steps (to step 2)" in printed and str(out / "hf") in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["fingerprint"]  # flags win over the config file
    assert main(["train", "--out", str(out), "--model", str(tiny_llama_dir), "--export", "latest"]) == 0
    assert f"exported: {out / 'hf'}" in capsys.readouterr().out


def test_bad_input_exits_2_with_one_line(tiny_llama_dir, tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "nope.jsonl"), "--model", str(tiny_llama_dir),
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.jsonl" in err and err.count("\n") == 1
    assert main(["train", "--lr", "-1", "--data", "x"]) == 2
    assert "'lr'" in capsys.readouterr().err
    assert main(["train", "--out", str(tmp_path), "--export", "first"]) == 2
