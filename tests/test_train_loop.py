"""Whole runs on a tiny model and a tiny KGFact corpus: determinism, exact resume after a kill,
extending a finished run, refusing a different config, memorization with an export that
transformers loads to the same logits, and clear errors for bad input and non-finite losses.

Every run here uses the same model, batch shape and mesh (one device: determinism and resume are
checked bitwise there; tests/test_train_step.py compares 8 devices with 1), so the train step
compiles once per optimizer setting for the whole module.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

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
    return out / KGFACT_TRAIN  # 12 records: 2 steps per epoch at batch size 8


def _cfg(model_dir, data, out, *extra):
    return load_train_config(
        None, [f"model={model_dir}", f"data={data}", f"out={out}", f"steps={STEPS}", "batch_size=8", "lr=1e-2",
               "save_every=3", "max_seq_len=160", "pad_to_max_len=true", "seed=0", "async_checkpoints=false", "mesh.data=1",
               *extra]
    )


def _losses(out):
    return [(row["step"], row["loss"], row["accuracy"], row["grad_norm"], row["tokens"]) for row in
            read_partial_jsonl(out / "metrics.jsonl")]


def _weights(out):
    return (out / "hf" / "model.safetensors").read_bytes()


def _tb_losses(folder) -> dict[int, float]:
    """step -> `train/loss` from every TensorBoard event file in `folder` (TFRecord framing: length,
    its CRC, the Event proto, its CRC)."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    losses = {}
    for path in sorted(folder.iterdir()):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            losses.update((event.step, v.simple_value) for v in event.summary.value if v.tag == "train/loss")
    return losses


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    summary = train(_cfg(tiny_llama_dir, corpus, out), progress=False)
    return out, summary


def test_run_outputs_and_summary(straight):
    out, summary = straight
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert summary["steps"] == STEPS and summary["start_step"] == 0 and summary["records"] == 12
    assert summary["examples"] == 12 and summary["dropped_overlong"] == 0 and summary["truncated"] == 0
    assert summary["steps_per_epoch"] == 2 and summary["devices"] == 1
    rows = read_partial_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert summary["final_loss"] == rows[-1]["loss"] and rows[-1]["loss"] < rows[0]["loss"]
    assert summary["tokens"] == sum(r["tokens"] for r in rows) and summary["tokens_per_s"] > 0
    assert {"loss", "accuracy", "grad_norm", "lr", "tokens_per_s"} <= set(rows[0])
    assert _tb_losses(out / "tb") == {r["step"]: np.float32(r["loss"]) for r in rows}
    assert sorted(Checkpoints(out / "checkpoints").all_steps()) == [3, 6]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "hf" / name).is_file()


def test_same_seed_same_curve_and_bitwise_parameters(straight, tiny_llama_dir, corpus, tmp_path):
    out, _ = straight
    train(_cfg(tiny_llama_dir, corpus, tmp_path), progress=False)
    assert _losses(tmp_path) == _losses(out)
    assert _weights(tmp_path) == _weights(out)


def test_killed_run_resumes_exactly(straight, tiny_llama_dir, corpus, tmp_path):
    out, _ = straight

    def kill_after_step_4(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    # Asynchronous saves here: the step-3 checkpoint must hold the step-3 state even though the
    # next (donating) step runs while it is written.
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_llama_dir, corpus, tmp_path, "async_checkpoints=true"), progress=False, on_step=kill_after_step_4)
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == [3]
    assert len(read_partial_jsonl(tmp_path / "metrics.jsonl")) == 4  # step 4 was logged, not saved
    meta = Checkpoints(tmp_path / "checkpoints").read_meta(3)
    assert meta["data_position"] == {"next_step": 3, "epoch": 1, "batch_in_epoch": 1}

    summary = train(_cfg(tiny_llama_dir, corpus, tmp_path), progress=False)
    assert summary["start_step"] == 3 and summary["steps_this_run"] == 3
    assert _losses(tmp_path) == _losses(out)  # same batches in the same order, same numbers
    assert _weights(tmp_path) == _weights(out)


def test_finished_run_extends_and_other_configs_are_refused(straight, tiny_llama_dir, corpus, tmp_path):
    out, _ = straight
    short = _cfg(tiny_llama_dir, corpus, tmp_path, "steps=3")
    assert train(short, progress=False)["steps"] == 3
    again = train(short, progress=False)  # nothing left to do
    assert again["steps_this_run"] == 0 and again["final_loss"] == _losses(tmp_path)[-1][1]
    summary = train(_cfg(tiny_llama_dir, corpus, tmp_path), progress=False)
    assert summary["start_step"] == 3
    assert _losses(tmp_path) == _losses(out) and _weights(tmp_path) == _weights(out)

    with pytest.raises(MixsdError, match=r"fingerprint [0-9a-f]{16}.* has [0-9a-f]{16} \(differing keys: lr, seed\)"):
        train(_cfg(tiny_llama_dir, corpus, tmp_path, "lr=2e-2", "seed=1"), progress=False)
    with pytest.raises(MixsdError, match="past this run's 3 steps"):
        train(short, progress=False)


def test_auto_precision_is_recorded_resolved(tiny_llama_dir, corpus, tmp_path):
    """A checkpoint names the dtype `auto` picked on this machine, so a resume where it would pick
    another is refused by the fingerprint."""
    from mixsd_jax.train.precision import resolve_compute_dtype

    train(_cfg(tiny_llama_dir, corpus, tmp_path, "steps=1", "compute_dtype=auto"), progress=False)
    ckpt = Checkpoints(tmp_path / "checkpoints")
    picked = resolve_compute_dtype("auto", "cpu")
    assert ckpt.read_meta(1)["config_fingerprinted"]["compute_dtype"] == picked
    ckpt.close()
    other = "bfloat16" if picked == "float32" else "float32"
    with pytest.raises(MixsdError, match=r"differing keys: compute_dtype\)"):
        train(_cfg(tiny_llama_dir, corpus, tmp_path, "steps=2", f"compute_dtype={other}"), progress=False)


def test_memorizes_and_export_matches_in_transformers(tiny_llama_dir, corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    from mixsd_jax.models.checkpoint import load_hf
    from mixsd_jax.models.sharding import make_mesh
    from mixsd_jax.models.transformer import forward, lm_logits
    from mixsd_jax.train import step as step_lib

    cfg = _cfg(tiny_llama_dir, corpus, tmp_path, "steps=60", "save_every=0")
    train(cfg, progress=False)
    last = read_partial_jsonl(tmp_path / "metrics.jsonl")[-5:]
    assert np.median([r["loss"] for r in last]) < 0.02  # from 6.1 at step 1
    assert np.median([r["accuracy"] for r in last]) > 0.99

    # Our logits from the final checkpoint against transformers' on the exported directory.
    model_cfg = load_hf(tiny_llama_dir)[0]
    opt = step_lib.OptimConfig.from_train_config(cfg, 60)
    tx = step_lib.make_optimizer(opt)
    shardings = step_lib.state_shardings(model_cfg, tx, make_mesh(cfg.mesh))
    ckpt = Checkpoints(tmp_path / "checkpoints")
    state, _ = ckpt.restore(60, step_lib.abstract_state(model_cfg, tx, shardings, "float32"))
    ckpt.close()
    tokens = np.array([[5, 17, 42, 99, 7, 3, 250, 11]], np.int32)
    seg = np.ones_like(tokens)
    hidden, _ = forward(jax.device_get(state.params), model_cfg, tokens, np.arange(8)[None], seg)
    ours = np.asarray(lm_logits(jax.device_get(state.params), model_cfg, hidden))
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(tokens.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama_dir, corpus, tmp_path):
    cfg = _cfg(tiny_llama_dir, corpus, tmp_path, "lr=1e30", "save_every=1")
    with pytest.raises(MixsdError, match=r"non-finite loss .* at step 2: .*last good checkpoint: step 1"):
        train(cfg, progress=False)
    assert Checkpoints(tmp_path / "checkpoints").all_steps() == [1]


def test_bad_data_is_a_clear_error(tiny_llama_dir, corpus, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cases = [
        (tmp_path / "missing.jsonl", "missing.jsonl: no such file"),
        (empty, "no training records"),
        ("", "config key 'data': required"),
    ]
    for data, message in cases:
        with pytest.raises(MixsdError, match=message):
            train(_cfg(tiny_llama_dir, data, tmp_path / "out"), progress=False)
    with pytest.raises(MixsdError, match=r"all 12 records are longer than max_seq_len=16"):
        train(_cfg(tiny_llama_dir, corpus, tmp_path / "out", "max_seq_len=16"), progress=False)
    with pytest.raises(MixsdError, match=r"micro batch .* divisible by the mesh's data x fsdp = 8"):
        train(_cfg(tiny_llama_dir, corpus, tmp_path / "out", "batch_size=4", "mesh.data=-1"), progress=False)


def test_a_run_in_a_bucket_resumes_exactly(straight, tiny_llama_dir, corpus, gcs_bucket):
    """Orbax checkpoints, metrics and the export all in a bucket: a killed run resumes to the
    numbers and weights of the local straight run."""
    from mixsd_jax import storage

    out, _ = straight
    url = storage.path(f"{gcs_bucket}/run")

    def kill_after_step_4(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tiny_llama_dir, corpus, url), progress=False, on_step=kill_after_step_4)
    assert Checkpoints(url / "checkpoints").all_steps() == [3]
    assert len(read_partial_jsonl(url / "metrics.jsonl")) == 4
    summary = train(_cfg(tiny_llama_dir, corpus, url), progress=False)
    assert summary["start_step"] == 3 and summary["hf"] == f"{url}/hf"
    assert _losses(url) == _losses(out)
    assert _weights(url) == _weights(out)
    assert (url / "hf" / ".mixsd_complete").exists() and json.loads((url / "summary.json").read_text()) == summary
    # TensorBoard's event files are uploaded whole (one per run: the killed one's up to step 4, then
    # the resumed one's), and nothing went to a local `gs:` folder.
    assert len(list((url / "tb").iterdir())) == 2
    assert _tb_losses(url / "tb") == {step: np.float32(loss) for step, loss, *_ in _losses(out)}
    assert not list(Path.cwd().glob("gs:*"))


def test_the_final_export_is_the_last_steps_export_linked_or_copied(straight, tiny_llama_dir, corpus, tmp_path,
                                                                    gcs_bucket):
    """With `export_every`, `hf` is the step-6 export's files byte for byte (hard links on a local
    disk, object copies in a bucket), and those weights are the ones the export of the final state
    writes when no step export exists (the straight run)."""
    from mixsd_jax import storage

    out, _ = straight
    for run in (tmp_path / "run", storage.path(f"{gcs_bucket}/exported")):
        train(_cfg(tiny_llama_dir, corpus, run, "export_every=true"), progress=False)
        exports = run / "exports"
        assert sorted(p.name for p in exports.iterdir()) == ["step_3", "step_6"]
        names = sorted(p.name for p in (run / "hf").iterdir())
        assert names == sorted(p.name for p in (exports / "step_6").iterdir())
        for name in names:
            assert (run / "hf" / name).read_bytes() == (exports / "step_6" / name).read_bytes(), name
        assert _weights(run) == _weights(out)
    local = tmp_path / "run"
    assert (local / "hf" / "model.safetensors").stat().st_ino == (local / "exports" / "step_6" / "model.safetensors").stat().st_ino
    assert not [p for p in local.iterdir() if p.name.startswith(".hf.")]  # no temp folder left behind
    assert (storage.path(f"{gcs_bucket}/exported") / "hf" / ".mixsd_complete").exists()
