"""Architecture description of a decoder-only model, read from an HF `config.json`.

One hashable frozen dataclass covers the families we support, so it can be a static argument of
`jax.jit`. The family differences are three switches: q/k/v bias (Qwen2), per-head q/k RMSNorm
(Qwen3) and the RoPE frequency rule (Llama-3 scaling).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    rope_type: str  # "linear" or "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    max_position_embeddings: int = 4096
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise MixsdError(
                f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise MixsdError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MixsdError(
                f"{source}: unsupported model_type {model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need(key):
            if key not in hf:
                raise MixsdError(f"{source}: missing field {key!r}")
            return hf[key]

        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise MixsdError(f"{source}: unsupported hidden_act {act!r} (only silu)")
        if hf.get("use_sliding_window"):
            raise MixsdError(f"{source}: sliding-window attention is not supported")
        if hf.get("mlp_bias"):
            raise MixsdError(f"{source}: mlp_bias=true is not supported")
        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        # transformers v5 writes `rope_parameters`; v4 wrote `rope_theta` + `rope_scaling`.
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope_theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling_src = {**legacy, **{k: v for k, v in rope.items() if k != "rope_theta"}}
        rope_type = scaling_src.get("rope_type", scaling_src.get("type", "default"))
        if rope_type == "default":
            scaling = None
        elif rope_type in ("linear", "llama3"):
            scaling = RopeScaling(
                rope_type=rope_type,
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling_src.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling_src.get("original_max_position_embeddings", 8192)),
            )
        else:
            raise MixsdError(f"{source}: unsupported rope type {rope_type!r} (default, linear, llama3)")
        eos = hf.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hidden // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type == "qwen3",
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        )

    @classmethod
    def from_hf_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = storage.path(model_dir) / "config.json"
        if not path.is_file():
            raise MixsdError(f"{model_dir}: not an HF model directory (no config.json)")
        try:
            hf = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MixsdError(f"{path}: malformed JSON ({exc.msg})") from None
        return cls.from_hf_dict(hf, source=str(path))

    def to_hf_dict(self, torch_dtype: str = "float32") -> dict:
        """An HF config.json that transformers loads into the matching *ForCausalLM class."""
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        rope: dict = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
        out = {
            "architectures": [arch[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": torch_dtype,
            "dtype": torch_dtype,
        }
        if self.model_type != "qwen2":
            out["attention_bias"] = self.qkv_bias
        if self.rope_scaling is not None:
            out["rope_scaling"] = dict(rope)
        return out
