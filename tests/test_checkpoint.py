"""HF checkpoint I/O: export round trip through transformers, sharded files, and bad checkpoints."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from mixsd_jax.errors import MixsdError
from mixsd_jax.models import checkpoint as ckpt
from mixsd_jax.models.checkpoint import export_hf, load_hf


def _logits(model_dir, tokens):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens)).logits.numpy()


def test_export_loads_in_transformers_with_same_logits(tiny_model_dir, tmp_path):
    cfg, params = load_hf(tiny_model_dir)
    out = export_hf(params, cfg, tmp_path / "exported", tokenizer_dir=tiny_model_dir)
    assert (out / "tokenizer.json").is_file()
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9))
    np.testing.assert_allclose(_logits(out, tokens), _logits(tiny_model_dir, tokens), atol=1e-5)
    cfg2, params2 = load_hf(out)
    assert cfg2 == cfg


def test_sharded_safetensors_with_index(tiny_qwen2_dir, tmp_path):
    cfg, params = load_hf(tiny_qwen2_dir)
    out = export_hf(params, cfg, tmp_path / "sharded", shard_bytes=20_000)
    assert (out / "model.safetensors.index.json").is_file()
    assert len(list(out.glob("model-*.safetensors"))) > 1
    _, params2 = load_hf(out)
    np.testing.assert_array_equal(np.asarray(params2["layers"]["wq"]), np.asarray(params["layers"]["wq"]))
    tokens = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, 6))
    np.testing.assert_allclose(_logits(out, tokens), _logits(tiny_qwen2_dir, tokens), atol=1e-5)


def test_bf16_export_round_trip(tiny_llama_dir, tmp_path):
    cfg, params = load_hf(tiny_llama_dir)
    out = export_hf(params, cfg, tmp_path / "bf16", dtype="bfloat16")
    _, params_bf16 = load_hf(out, param_dtype="bfloat16")
    assert params_bf16["embed"].dtype.name == "bfloat16"
    np.testing.assert_allclose(np.asarray(params_bf16["embed"], np.float32), np.asarray(params["embed"]), rtol=1e-2)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unsupported_model_type(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(conf))
    with pytest.raises(MixsdError, match="unsupported model_type 'gpt2'"):
        load_hf(d)


def test_missing_tensor_is_named(tiny_llama_dir, tmp_path):
    tensors = {k: np.asarray(v) for k, v in ckpt.read_hf_tensors(tiny_llama_dir).items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    d = _copy(tiny_llama_dir, tmp_path / "m")
    ckpt._write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(MixsdError, match=r"missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_hf(d)


def test_misshaped_tensor_is_named(tiny_llama_dir, tmp_path):
    tensors = {k: np.asarray(v) for k, v in ckpt.read_hf_tensors(tiny_llama_dir).items()}
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 3), np.float32)
    d = _copy(tiny_llama_dir, tmp_path / "m")
    ckpt._write_safetensors(d / "model.safetensors", tensors)
    with pytest.raises(MixsdError, match=r"'model.layers.0.self_attn.k_proj.weight' has shape \(3, 3\)"):
        load_hf(d)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(MixsdError, match="no config.json"):
        load_hf(tmp_path)


def test_a_corrupt_safetensors_file_is_named(tiny_llama_dir, tmp_path):
    d = _copy(tiny_llama_dir, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(MixsdError, match=r"model.safetensors: not a readable safetensors file"):
        load_hf(d)


def test_lazy_tensors_read_blocks_of_the_stored_bytes(tiny_llama_dir):
    """Indexing a (transposed) lazy tensor reads the same values as the whole stored array."""
    from safetensors.numpy import load_file

    stored = load_file(str(tiny_llama_dir / "model.safetensors"))
    lazy = ckpt.read_hf_tensors(tiny_llama_dir)
    name = "model.layers.0.self_attn.q_proj.weight"
    whole = stored[name]
    assert lazy[name].shape == whole.shape and lazy[name].T.shape == whole.T.shape
    np.testing.assert_array_equal(lazy[name][1:3], whole[1:3])
    np.testing.assert_array_equal(lazy[name].T[2:5, 1:4], whole.T[2:5, 1:4])
    np.testing.assert_array_equal(np.asarray(lazy[name].T), whole.T)


def _upload(local_dir, url):
    from mixsd_jax import storage

    for f in sorted(local_dir.iterdir()):
        if f.is_file():
            (storage.path(url) / f.name).write_bytes(f.read_bytes())
    return url


@pytest.mark.parametrize("fsdp", [1, 4])
def test_a_model_in_a_bucket_loads_bit_equal_to_the_local_copy(tiny_qwen2_dir, tmp_path, gcs_bucket, fsdp):
    import jax

    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.models.tokenizer import load_tokenizer

    local = export_hf(load_hf(tiny_qwen2_dir)[1], load_hf(tiny_qwen2_dir)[0], tmp_path / "sharded",
                      tokenizer_dir=tiny_qwen2_dir, shard_bytes=20_000)  # several shards and an index
    url = _upload(local, f"{gcs_bucket}/models/tiny")
    mesh = make_mesh(MeshConfig(fsdp=fsdp)) if fsdp > 1 else None
    cfg_local, params_local = load_hf(local, mesh=mesh)
    cfg_url, params_url = load_hf(url, mesh=mesh)
    assert cfg_url == cfg_local
    for a, b in zip(jax.tree.leaves(params_url), jax.tree.leaves(params_local)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert load_tokenizer(url).encode("hello world") == load_tokenizer(local).encode("hello world")


def test_ranged_reads_cut_blocks_like_safetensors(tiny_llama_dir, gcs_bucket):
    from safetensors import safe_open

    from mixsd_jax.models.remote_safetensors import open_ranged

    url = _upload(tiny_llama_dir, f"{gcs_bucket}/m")
    ranged = open_ranged(f"{url}/model.safetensors")
    with safe_open(str(tiny_llama_dir / "model.safetensors"), framework="numpy") as handle:
        for name in sorted(ranged)[:6]:
            whole = handle.get_tensor(name)
            blocks = [(slice(None),), (slice(1, 3),), (slice(0, 4, 2),), (2,)]
            for idx in blocks + ([(slice(0, 4, 2), slice(1, 3))] if whole.ndim > 1 else []):
                np.testing.assert_array_equal(ranged[name][idx], whole[idx])


def test_export_of_fsdp8_sharded_parameters_writes_the_unsharded_bytes(tiny_qwen3_dir, tmp_path):
    """The export cuts stacked parameters one layer at a time out of the sharded state: the files
    are those of an export from whole arrays, sharded safetensors and index included."""
    from mixsd_jax.models.sharding import MeshConfig, make_mesh

    cfg, whole = load_hf(tiny_qwen3_dir)
    _, sharded = load_hf(tiny_qwen3_dir, mesh=make_mesh(MeshConfig(fsdp=8)))
    assert len(sharded["layers"]["w_gate"].sharding.device_set) == 8
    a = export_hf(whole, cfg, tmp_path / "whole", shard_bytes=20_000)
    b = export_hf(sharded, cfg, tmp_path / "sharded", shard_bytes=20_000)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "model.safetensors.index.json" in names
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
