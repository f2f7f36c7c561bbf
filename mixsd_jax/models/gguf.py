"""GGUF (llama.cpp) import: a llama or gemma3 GGUF file -> an HF-format model directory.

The output is what transformers itself would save for the model: `config.json` (LlamaConfig or
Gemma3TextConfig fields), float32 `model.safetensors` with HF tensor names, the tokenizer files
transformers builds from the GGUF metadata (including the chat template) and
`generation_config.json`. Everything downstream (our JAX loader, transformers, vLLM) then reads one
format only.

Quantized tensors are dequantized with the `gguf` package. For llama, llama.cpp's converter
interleaves the rows of each q/k head (it stores rotary pairs as (even, odd) rows, HF stores them
as two halves); `_unpermute_rows` undoes that so HF's rotate-half RoPE gives the same numbers. For
gemma3 it permutes nothing, but stores every RMSNorm weight as 1 + w (HF keeps w): we subtract 1.
A gemma3 GGUF does not record the layer pattern, the sliding layers' RoPE base or the attention
scalar; we write Gemma 3's (every sixth layer full, base 10,000, 256), as transformers assumes, and
a Gemma turn-format chat template when the file has none (the base models).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

# Bump when the output of `convert_gguf_to_hf` changes; the registry re-converts cached models.
CONVERTER_VERSION = 1

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")


def convert_gguf_to_hf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Dequantize a llama/gemma3 GGUF into an HF-format directory at `out_dir` (replaced whole).

    Either may be a bucket URL: a GGUF there is copied to a local temporary file first (the
    reader maps a local file); the directory is built locally, then renamed into place on a local
    disk or uploaded into the bucket folder with its commit marker last."""
    from safetensors.numpy import save_file

    out_dir = storage.path(out_dir)
    check_replaceable(out_dir)
    with _local_file(gguf_path) as local:
        reader = _open(local, gguf_path)
        architecture = _meta(reader, gguf_path, "general.architecture")
        if architecture not in SUPPORTED_ARCHITECTURES:
            raise MixsdError(
                f"{gguf_path}: GGUF architecture {architecture!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        config = (gemma3_config if architecture == "gemma3" else llama_config)(reader, gguf_path)
        tensors = read_tensors(reader, gguf_path, config, architecture)
        tmp = Path(tempfile.mkdtemp(dir=_temp_parent(out_dir), prefix=f".{out_dir.name}.tmp-"))
        try:
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            del tensors  # free the float32 weights before transformers parses the GGUF again
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            generation = {
                key: config[key] for key in ("bos_token_id", "eos_token_id", "pad_token_id") if key in config
            }
            (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
            _save_tokenizer(reader, gguf_path, tmp, config["max_position_embeddings"], architecture)
            _make_readable(tmp)
            if storage.is_url(out_dir):
                _upload_dir(tmp, out_dir)
            else:
                _replace_dir(tmp, Path(out_dir))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


@contextlib.contextmanager
def _local_file(gguf_path: str | Path):
    """A local path to read `gguf_path` from: itself, or a temporary copy of a bucket object."""
    if not storage.is_url(gguf_path):
        yield Path(gguf_path)
        return
    source = storage.path(gguf_path)
    if not source.is_file():
        raise MixsdError(f"{gguf_path}: GGUF file not found")
    with tempfile.TemporaryDirectory(prefix="mixsd-gguf-") as scratch:
        local = Path(scratch) / source.name
        with source.open("rb") as src, open(local, "wb") as dst:  # a local temporary file
            shutil.copyfileobj(src, dst, 16 << 20)
        yield local


def _temp_parent(out_dir) -> str | None:
    """Where the directory is built: next to a local `out_dir` (one rename), the system's temporary
    folder for a bucket one."""
    if storage.is_url(out_dir):
        return None
    Path(out_dir).parent.mkdir(parents=True, exist_ok=True)
    return str(Path(out_dir).parent)


def _upload_dir(local: Path, out_dir) -> None:
    """The files of `local` into the bucket folder `out_dir` (emptied first), the marker last."""
    storage.remove(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in sorted(local.iterdir()):
        (out_dir / path.name).write_bytes(path.read_bytes())
    storage.commit_marker(out_dir).write_text("")


def llama_config(reader, gguf_path: Path) -> dict:
    """transformers LlamaConfig fields from the GGUF metadata (`llama.*`, `tokenizer.ggml.*`)."""
    hidden = int(_meta(reader, gguf_path, "llama.embedding_length"))
    heads = int(_meta(reader, gguf_path, "llama.attention.head_count"))
    kv_heads = int(_meta(reader, gguf_path, "llama.attention.head_count_kv", default=heads))
    head_dim = int(_meta(reader, gguf_path, "llama.attention.key_length", default=hidden // heads))
    rope_dim = int(_meta(reader, gguf_path, "llama.rope.dimension_count", default=head_dim))
    if rope_dim != head_dim:
        raise MixsdError(
            f"{gguf_path}: llama.rope.dimension_count={rope_dim} differs from head_dim={head_dim} "
            "(partial rotary embeddings are not supported)"
        )
    scaling = _meta(reader, gguf_path, "llama.rope.scaling.type", default="none")
    if scaling != "none":
        raise MixsdError(f"{gguf_path}: llama.rope.scaling.type={scaling!r} is not supported")
    token_count = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    vocab = int(_meta(reader, gguf_path, "llama.vocab_size", default=token_count))
    names = {t.name for t in reader.tensors}
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, gguf_path, "llama.feed_forward_length")),
        "num_hidden_layers": int(_meta(reader, gguf_path, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": float(_meta(reader, gguf_path, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_meta(reader, gguf_path, "llama.rope.freq_base", default=10000.0)),
        "max_position_embeddings": int(_meta(reader, gguf_path, "llama.context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    return config | _special_token_ids(reader, gguf_path)


def _special_token_ids(reader, gguf_path: Path) -> dict:
    """The bos / eos / pad ids the GGUF's tokenizer metadata names, as HF config keys."""
    ids = {}
    for gguf_key, hf_key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("padding", "pad_token_id")):
        value = _meta(reader, gguf_path, f"tokenizer.ggml.{gguf_key}_token_id", default=None)
        if value is not None:
            ids[hf_key] = int(value)
    return ids


def gemma3_config(reader, gguf_path: Path) -> dict:
    """transformers Gemma3TextConfig fields from the GGUF metadata (`gemma3.*`, `tokenizer.ggml.*`)."""
    from mixsd_jax.models.config import FULL, SLIDING

    hidden = int(_meta(reader, gguf_path, "gemma3.embedding_length"))
    heads = int(_meta(reader, gguf_path, "gemma3.attention.head_count"))
    layers = int(_meta(reader, gguf_path, "gemma3.block_count"))
    names = {t.name for t in reader.tensors}
    token_count = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(_meta(reader, gguf_path, "gemma3.feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(_meta(reader, gguf_path, "gemma3.attention.head_count_kv", default=heads)),
        "head_dim": int(_meta(reader, gguf_path, "gemma3.attention.key_length", default=hidden // heads)),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "rms_norm_eps": float(_meta(reader, gguf_path, "gemma3.attention.layer_norm_rms_epsilon")),
        "rope_parameters": {
            FULL: {"rope_type": "default", "rope_theta": float(_meta(reader, gguf_path, "gemma3.rope.freq_base"))},
            SLIDING: {"rope_type": "default", "rope_theta": 10000.0},
        },
        "sliding_window": int(_meta(reader, gguf_path, "gemma3.attention.sliding_window")),
        "layer_types": [SLIDING if (i + 1) % 6 else FULL for i in range(layers)],
        "query_pre_attn_scalar": 256,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "max_position_embeddings": int(_meta(reader, gguf_path, "gemma3.context_length")),
        "vocab_size": int(_meta(reader, gguf_path, "gemma3.vocab_size", default=token_count)),
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    return config | _special_token_ids(reader, gguf_path)


def _expected_tensors(config: dict, architecture: str) -> dict[str, tuple[str, tuple[int, ...], int, float]]:
    """gguf name -> (HF name, expected HF shape, heads to un-permute or 0, offset to subtract)."""
    hidden, ffn = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads, head_dim = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    gemma = architecture == "gemma3"
    one = 1.0 if gemma else 0.0  # gemma3 GGUFs store norms as 1 + w
    q_heads, k_heads = (0, 0) if gemma else (heads, kv_heads)
    expected = {
        "token_embd.weight": ("model.embed_tokens.weight", (config["vocab_size"], hidden), 0, 0.0),
        "output_norm.weight": ("model.norm.weight", (hidden,), 0, one),
    }
    if not config["tie_word_embeddings"]:
        expected["output.weight"] = ("lm_head.weight", (config["vocab_size"], hidden), 0, 0.0)
    for i in range(config["num_hidden_layers"]):
        hf = f"model.layers.{i}"
        expected.update(
            {
                f"blk.{i}.attn_norm.weight": (f"{hf}.input_layernorm.weight", (hidden,), 0, one),
                f"blk.{i}.ffn_norm.weight": (
                    f"{hf}.{'pre_feedforward' if gemma else 'post_attention'}_layernorm.weight", (hidden,), 0, one),
                f"blk.{i}.attn_q.weight": (f"{hf}.self_attn.q_proj.weight", (heads * head_dim, hidden), q_heads, 0.0),
                f"blk.{i}.attn_k.weight": (f"{hf}.self_attn.k_proj.weight", (kv_heads * head_dim, hidden), k_heads,
                                           0.0),
                f"blk.{i}.attn_v.weight": (f"{hf}.self_attn.v_proj.weight", (kv_heads * head_dim, hidden), 0, 0.0),
                f"blk.{i}.attn_output.weight": (f"{hf}.self_attn.o_proj.weight", (hidden, heads * head_dim), 0, 0.0),
                f"blk.{i}.ffn_gate.weight": (f"{hf}.mlp.gate_proj.weight", (ffn, hidden), 0, 0.0),
                f"blk.{i}.ffn_up.weight": (f"{hf}.mlp.up_proj.weight", (ffn, hidden), 0, 0.0),
                f"blk.{i}.ffn_down.weight": (f"{hf}.mlp.down_proj.weight", (hidden, ffn), 0, 0.0),
            }
        )
        if gemma:
            expected.update({
                f"blk.{i}.attn_q_norm.weight": (f"{hf}.self_attn.q_norm.weight", (head_dim,), 0, one),
                f"blk.{i}.attn_k_norm.weight": (f"{hf}.self_attn.k_norm.weight", (head_dim,), 0, one),
                f"blk.{i}.post_attention_norm.weight": (f"{hf}.post_attention_layernorm.weight", (hidden,), 0, one),
                f"blk.{i}.post_ffw_norm.weight": (f"{hf}.post_feedforward_layernorm.weight", (hidden,), 0, one),
            })
    return expected


def read_tensors(reader, gguf_path: Path, config: dict, architecture: str = "llama") -> dict[str, np.ndarray]:
    """HF-named float32 arrays; a missing, extra or mis-shaped tensor is an error naming it."""
    from gguf.quants import dequantize

    expected = _expected_tensors(config, architecture)
    by_name = {t.name: t for t in reader.tensors}
    unexpected = sorted(set(by_name) - set(expected))
    if unexpected:
        raise MixsdError(f"{gguf_path}: unexpected tensor {unexpected[0]!r} for a {architecture} model")
    tensors = {}
    for name, (hf_name, shape, permuted_heads, offset) in expected.items():
        if name not in by_name:
            raise MixsdError(f"{gguf_path}: tensor {name!r} ({hf_name}) is missing")
        tensor = by_name[name]
        # GGUF lists dimensions fastest-first; reversed they are numpy's row-major shape.
        stored_shape = tuple(int(d) for d in reversed(tensor.shape))
        if stored_shape != shape:
            raise MixsdError(
                f"{gguf_path}: tensor {name!r} ({hf_name}) has shape {list(stored_shape)}, expected {list(shape)}"
            )
        array = dequantize(tensor.data, tensor.tensor_type)
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        if permuted_heads:
            array = _unpermute_rows(array, permuted_heads)
        if offset:
            array = array - np.float32(offset)
        tensors[hf_name] = np.ascontiguousarray(array)
    return tensors


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's q/k permutation: per head, (pairs, 2) rows -> (2, pairs) rows."""
    rows, d_in = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(rows, d_in)


def _gguf_tokenizer(reader, gguf_path: Path):
    """The fast tokenizer transformers builds for `AutoTokenizer.from_pretrained(gguf_file=...)`,
    from the same metadata and builders, but read with the `gguf` package: transformers' own GGUF
    reader imports PyTorch, which a plain `pip install -e .` does not have."""
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    grouped = {
        group: {name: _meta(reader, gguf_path, f"tokenizer.{key}") for key, name in renames.items()
                if f"tokenizer.{key}" in reader.fields}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":  # as transformers: llama.cpp adds BOS to these
        tokenizer_config.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = _meta(reader, gguf_path, f"tokenizer.ggml.{key}", None)
        tokenizer_config[name] = tokenizer_dict["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_meta(reader, gguf_path, "general.architecture"), tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config, **extra)


def _save_tokenizer(reader, gguf_path: Path, out_dir: Path, max_length: int, architecture: str = "llama") -> None:
    from mixsd_jax.models.tokenizer import GEMMA_CHAT_TEMPLATE

    try:
        tokenizer = _gguf_tokenizer(reader, gguf_path)
    except (ValueError, KeyError, OSError) as exc:
        raise MixsdError(f"{gguf_path}: transformers cannot build a tokenizer from this GGUF ({exc})") from None
    if architecture == "gemma3" and not tokenizer.chat_template:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out_dir))
    # transformers v5 may keep the chat template in a separate .jinja file; our contract (and older
    # readers such as vLLM's) also want it inside tokenizer_config.json.
    # The generic class name also loads in transformers v4 (and so in vLLM), unlike v5's backend name.
    config_path = out_dir / "tokenizer_config.json"
    tok_config = json.loads(config_path.read_text(encoding="utf-8"))
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config["model_max_length"] = max_length
    if tokenizer.chat_template:
        tok_config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special_path = out_dir / "special_tokens_map.json"
    if not special_path.exists():
        special = {
            key: value
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (value := getattr(tokenizer, key, None)) is not None
        }
        special_path.write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def check_replaceable(out_dir) -> None:
    """An output directory may replace nothing but an empty folder or an earlier model directory."""
    out_dir = storage.path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "config.json").is_file()):
        raise MixsdError(f"{out_dir}: exists and is not a model directory; refusing to replace it")


def _make_readable(directory: Path) -> None:
    """mkdtemp and safetensors create owner-only files; a cache directory should be like any other."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(new: Path, target: Path) -> None:
    """Move `new` to `target`; an existing `target` is swapped out first, then deleted."""
    if target.exists():
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
        os.replace(target, old / target.name)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def _open(local: Path, gguf_path):
    """The reader of the local file `local`; errors name `gguf_path`, the file the user gave."""
    from gguf import GGUFReader

    if not local.is_file():
        raise MixsdError(f"{gguf_path}: GGUF file not found")
    try:
        return GGUFReader(str(local))
    except (ValueError, OSError) as exc:
        raise MixsdError(f"{gguf_path}: not a readable GGUF file ({exc})") from None


_REQUIRED = object()


def _meta(reader, gguf_path: Path, key: str, default=_REQUIRED):
    field = reader.fields.get(key)
    if field is None:
        if default is _REQUIRED:
            raise MixsdError(f"{gguf_path}: GGUF metadata key {key!r} is missing")
        return default
    return field.contents()
