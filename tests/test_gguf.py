"""GGUF import, checked against transformers' own GGUF loader on tiny GGUFs written here.

`write_tiny_gguf` writes a llama.cpp-layout file the way llama.cpp's converter does (q/k rows
permuted, weights quantized, a byte-level BPE vocabulary in the metadata), so the reference is
independent of our converter: transformers dequantizes and un-permutes it with its own code.
The same comparison on the real 135M GGUF costs about a minute here (transformers' GGUF loader);
`mixsd models parity smollm2-135m-instruct --gguf` is where that is checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mixsd_jax.errors import MixsdError
from mixsd_jax.models.gguf import convert_gguf_to_hf

TINY = dict(layers=2, hidden=64, heads=4, kv_heads=2, head_dim=16, ffn=128)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
PROMPTS = ["The capital of France is", "What is 12 + 30? The answer is 42.", "<|im_start|>user\nhello<|im_end|>\n"]


def _tiny_vocab() -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([" ".join(PROMPTS)] * 4, trainer=trainer)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    return tokens, merges


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to q/k rows (HF halves -> interleaved pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: str | Path,
    *,
    architecture: str = "llama",
    seed: int = 0,
    tied: bool = True,
    qtype: str = "Q8_0",
    drop: tuple[str, ...] = (),
    wrong_shape: str | None = None,
) -> dict[str, np.ndarray]:
    """Writes a tiny random llama GGUF; returns the HF-named float32 weights it was made from."""
    import gguf

    tokens, merges = _tiny_vocab()
    L, D, H, KV, hd, F = (TINY[k] for k in ("layers", "hidden", "heads", "kv_heads", "head_dim", "ffn"))
    V = len(tokens)
    rng = np.random.default_rng(seed)

    def rand(*shape, scale=0.1):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    # gguf name -> (HF name, HF-layout weights)
    weights = {"token_embd.weight": ("model.embed_tokens.weight", rand(V, D, scale=0.5))}
    weights["output_norm.weight"] = ("model.norm.weight", 1 + rand(D))
    if not tied:
        weights["output.weight"] = ("lm_head.weight", rand(V, D, scale=0.5))
    for i in range(L):
        hf = f"model.layers.{i}"
        weights.update(
            {
                f"blk.{i}.attn_norm.weight": (f"{hf}.input_layernorm.weight", 1 + rand(D)),
                f"blk.{i}.ffn_norm.weight": (f"{hf}.post_attention_layernorm.weight", 1 + rand(D)),
                f"blk.{i}.attn_q.weight": (f"{hf}.self_attn.q_proj.weight", rand(H * hd, D, scale=0.3)),
                f"blk.{i}.attn_k.weight": (f"{hf}.self_attn.k_proj.weight", rand(KV * hd, D, scale=0.3)),
                f"blk.{i}.attn_v.weight": (f"{hf}.self_attn.v_proj.weight", rand(KV * hd, D, scale=0.3)),
                f"blk.{i}.attn_output.weight": (f"{hf}.self_attn.o_proj.weight", rand(D, H * hd)),
                f"blk.{i}.ffn_gate.weight": (f"{hf}.mlp.gate_proj.weight", rand(F, D)),
                f"blk.{i}.ffn_up.weight": (f"{hf}.mlp.up_proj.weight", rand(F, D)),
                f"blk.{i}.ffn_down.weight": (f"{hf}.mlp.down_proj.weight", rand(D, F)),
            }
        )

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_name("tiny test model")
    writer.add_block_count(L)
    writer.add_context_length(256)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(H)
    writer.add_head_count_kv(KV)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(V)
    writer.add_rope_dimension_count(hd)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_unk_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    quant = gguf.GGMLQuantizationType[qtype]
    for name, (_, w) in weights.items():
        if name in drop:
            continue
        stored = w
        if ".attn_q." in name:
            stored = _llama_cpp_permute(w, H)
        elif ".attn_k." in name:
            stored = _llama_cpp_permute(w, KV)
        if name == wrong_shape:
            stored = stored[: stored.shape[0] // 2]
        if stored.ndim == 2 and quant != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(stored, quant), raw_dtype=quant)
        else:
            writer.add_tensor(name, stored)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {hf_name: w for hf_name, w in weights.values()}


def _logits(model, tokenizer, prompts):
    import torch

    with torch.no_grad():
        return [model(torch.tensor([tokenizer.encode(p, add_special_tokens=False)])).logits[0].numpy() for p in prompts]


@pytest.mark.parametrize("qtype,tied", [("Q8_0", True), ("Q4_1", False)])
def test_converted_dir_matches_transformers_gguf_load(tmp_path, qtype, tied):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf_path, qtype=qtype, tied=tied)
    out = convert_gguf_to_hf(gguf_path, tmp_path / "hf")

    ours = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    ref_tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    our_tok = AutoTokenizer.from_pretrained(out)
    assert ours.config.tie_word_embeddings is tied
    for prompt in PROMPTS:
        assert our_tok.encode(prompt, add_special_tokens=False) == ref_tok.encode(prompt, add_special_tokens=False)
    for a, b in zip(_logits(ours, our_tok, PROMPTS), _logits(ref, ref_tok, PROMPTS)):
        assert np.abs(a - b).max() <= 1e-4
        assert np.abs(a).max() > 1.0  # a real signal, not two all-zero models


BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # as if not installed: find_spec gives None, import raises
from pathlib import Path
from mixsd_jax.models.gguf import convert_gguf_to_hf
convert_gguf_to_hf(Path(sys.argv[1]), Path(sys.argv[2]))
"""


def test_conversion_needs_no_pytorch(tmp_path):
    """`pip install -e .` brings no PyTorch, and the demo's first step converts the embedded GGUF."""
    import subprocess
    import sys

    write_tiny_gguf(tmp_path / "tiny.gguf")
    run = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(tmp_path / "tiny.gguf"), str(tmp_path / "hf")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    reference = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf_here")
    for name in ("tokenizer.json", "special_tokens_map.json", "config.json", "model.safetensors"):
        assert (tmp_path / "hf" / name).read_bytes() == (reference / name).read_bytes(), name


def test_f32_gguf_round_trips_the_original_weights_exactly(tmp_path):
    from safetensors.numpy import load_file

    original = write_tiny_gguf(tmp_path / "tiny.gguf", qtype="F32")
    out = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(original)  # tied: no lm_head.weight
    for name, w in original.items():
        assert converted[name].dtype == np.float32
        np.testing.assert_array_equal(converted[name], w, err_msg=name)


def test_output_directory_layout_and_config(tmp_path):
    from transformers import AutoConfig

    write_tiny_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (2, 64, 4)
    assert (config["num_key_value_heads"], config["head_dim"], config["intermediate_size"]) == (2, 16, 128)
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert AutoConfig.from_pretrained(out).rope_parameters["rope_theta"] == 10000.0
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] == CHATML
    assert json.loads((out / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_converting_again_replaces_the_directory(tmp_path):
    write_tiny_gguf(tmp_path / "a.gguf", seed=0)
    write_tiny_gguf(tmp_path / "b.gguf", seed=1)
    out = convert_gguf_to_hf(tmp_path / "a.gguf", tmp_path / "hf")
    (out / "stale.txt").write_text("from the first conversion")
    before = (out / "model.safetensors").read_bytes()
    convert_gguf_to_hf(tmp_path / "b.gguf", out)
    assert not (out / "stale.txt").exists()
    assert (out / "model.safetensors").read_bytes() != before


def test_unsupported_architecture_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "q.gguf", architecture="qwen2")
    with pytest.raises(MixsdError, match=r"q\.gguf: GGUF architecture 'qwen2' is not supported"):
        convert_gguf_to_hf(tmp_path / "q.gguf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_missing_tensor_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",))
    missing = r"tensor 'blk\.1\.ffn_up\.weight' \(model\.layers\.1\.mlp\.up_proj\.weight\) is missing"
    with pytest.raises(MixsdError, match=missing):
        convert_gguf_to_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == [tmp_path / "m.gguf"]  # nothing half-written


def test_mis_shaped_tensor_is_named(tmp_path):
    write_tiny_gguf(tmp_path / "s.gguf", wrong_shape="blk.0.attn_k.weight")
    wrong = r"tensor 'blk\.0\.attn_k\.weight' .* has shape \[16, 64\], expected \[32, 64\]"
    with pytest.raises(MixsdError, match=wrong):
        convert_gguf_to_hf(tmp_path / "s.gguf", tmp_path / "hf")


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"definitely not gguf" * 10)
    with pytest.raises(MixsdError, match=r"x\.gguf: not a readable GGUF file"):
        convert_gguf_to_hf(tmp_path / "x.gguf", tmp_path / "hf")
    with pytest.raises(MixsdError, match=r"nope\.gguf: GGUF file not found"):
        convert_gguf_to_hf(tmp_path / "nope.gguf", tmp_path / "hf")


def test_a_gguf_in_a_bucket_converts_into_a_bucket(tmp_path, gcs_bucket, monkeypatch):
    """Both ends on gs://: the files are those of a local conversion, the commit marker written
    last, and nothing lands in a local `gs:` folder."""
    from mixsd_jax import storage

    monkeypatch.chdir(tmp_path)
    write_tiny_gguf(tmp_path / "tiny.gguf")
    local = convert_gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    (storage.path(f"{gcs_bucket}/in/tiny.gguf")).write_bytes((tmp_path / "tiny.gguf").read_bytes())
    out = convert_gguf_to_hf(f"{gcs_bucket}/in/tiny.gguf", f"{gcs_bucket}/models/tiny")
    assert str(out) == f"{gcs_bucket}/models/tiny" and storage.is_committed(out)
    names = sorted(p.name for p in local.iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted(names + [storage.COMMIT_MARKER])
    for name in names:
        assert (out / name).read_bytes() == (local / name).read_bytes(), name
    with pytest.raises(MixsdError, match=r"gs://.*/in/nope\.gguf: GGUF file not found"):
        convert_gguf_to_hf(f"{gcs_bucket}/in/nope.gguf", f"{gcs_bucket}/models/nope")
    assert not list(tmp_path.rglob("gs:*"))
