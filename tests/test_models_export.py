"""Exporting a training checkpoint to an HF directory that transformers loads, using only the
run directory (the config travels in the checkpoint's meta)."""

import numpy as np
import pytest
import torch

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.sharding import make_mesh
from mixsd_jax.train import step as step_lib
from mixsd_jax.train.checkpoints import Checkpoints
from mixsd_jax.train.config import TrainConfig, fingerprinted_dict, resume_fingerprint
from mixsd_jax.models.export import export_checkpoint


def test_checkpoint_exports_to_a_directory_transformers_loads(tiny_qwen2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config_lib.load(TrainConfig, None, [f"model={tiny_qwen2_dir}", "data=unused.jsonl", "mesh.data=2", "mesh.fsdp=4"])
    mesh = make_mesh(cfg.mesh)
    model_cfg, params = load_hf(tiny_qwen2_dir, mesh=mesh)
    opt = step_lib.OptimConfig.from_train_config(cfg, 2)
    tx = step_lib.make_optimizer(opt)
    state = step_lib.init_state(params, tx, step_lib.state_shardings(model_cfg, tx, mesh))
    ckpt = Checkpoints(tmp_path / "checkpoints", keep=5)
    for step in (1, 2):  # the untouched base weights, saved as two steps
        meta = {"step": step, "total_steps": 2, "fingerprint": resume_fingerprint(cfg),
                "config": config_lib.to_dict(cfg), "config_fingerprinted": fingerprinted_dict(cfg)}
        ckpt.save(step, state, meta, force=True)
    ckpt.wait()
    ckpt.close()

    assert export_checkpoint(tmp_path) == tmp_path / "hf"
    assert export_checkpoint(tmp_path, step=1) == tmp_path / "exports" / "step_1"
    base = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir, dtype=torch.float32).state_dict()
    for out in (tmp_path / "hf", tmp_path / "exports" / "step_1"):
        exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).state_dict()
        assert exported.keys() == base.keys()
        for name, tensor in base.items():
            np.testing.assert_array_equal(exported[name].numpy(), tensor.numpy(), err_msg=name)
        assert AutoTokenizer.from_pretrained(out).encode("The answer is 42.") == \
            AutoTokenizer.from_pretrained(tiny_qwen2_dir).encode("The answer is 42.")

    with pytest.raises(MixsdError, match=r"no checkpoint at step 3 \(saved: \[1, 2\]\)"):
        export_checkpoint(tmp_path, step=3)
    with pytest.raises(MixsdError, match="not a training output directory"):
        export_checkpoint(tmp_path / "hf")
