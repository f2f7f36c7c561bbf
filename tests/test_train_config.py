"""TrainConfig: loading, validation, and what the resume fingerprint does and does not cover."""

import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.train.config import (
    DistributedConfig,
    TrainConfig,
    differing_keys,
    fingerprinted_dict,
    load_train_config,
    resume_fingerprint,
)


def test_defaults_follow_the_reference_recipe():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.weight_decay, cfg.b1, cfg.b2, cfg.eps, cfg.clip_norm) == (1e-5, 0.01, 0.9, 0.95, 1e-8, 1.0)
    assert cfg.schedule == "constant" and cfg.batch_size == 16


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("lr: 3e-5\nbatch_size: 8\nmesh:\n  fsdp: 2\n")
    cfg = load_train_config(path, ["grad_accum=4", "schedule=cosine", "mesh.data=1"])
    assert cfg.lr == 3e-5 and cfg.batch_size == 8 and cfg.grad_accum == 4 and cfg.micro_batch == 2
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor) == (1, 2, 1)


@pytest.mark.parametrize(
    "override, key",
    [
        ("grad_accum=3", "grad_accum"),  # 16 is not divisible by 3
        ("lr=-1", "lr"),
        ("b2=1.5", "b2"),
        ("schedule=linear", "schedule"),
        ("overlong=cut", "overlong"),
        ("max_seq_len=1", "max_seq_len"),
        ("stepz=3", "stepz"),
    ],
)
def test_bad_values_name_the_key(override, key):
    with pytest.raises(MixsdError, match=key):
        load_train_config(None, [override])


def test_fingerprint_ignores_run_length_and_outputs_only():
    base = TrainConfig(data="a.jsonl")
    same = TrainConfig(data="a.jsonl", steps=100, epochs=3, out="elsewhere", save_every=5, keep=1, log_every=10,
                       export_every=True, distributed=DistributedConfig(coordinator="h:1", num_processes=2, process_id=1))
    assert resume_fingerprint(base) == resume_fingerprint(same)
    for changed in (TrainConfig(data="a.jsonl", lr=2e-5), TrainConfig(data="b.jsonl"), TrainConfig(data="a.jsonl", seed=1),
                    TrainConfig(data="a.jsonl", packing=True)):
        assert resume_fingerprint(changed) != resume_fingerprint(base)


def test_differing_keys_are_dotted():
    a = fingerprinted_dict(TrainConfig(lr=1e-5))
    b = fingerprinted_dict(load_train_config(None, ["lr=2e-5", "mesh.fsdp=2"]))
    assert differing_keys(a, b) == ["lr", "mesh.fsdp"]
