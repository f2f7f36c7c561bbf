"""Architecture description of a decoder-only model, read from an HF `config.json`.

One hashable frozen dataclass covers the families we support, so it can be a static argument of
`jax.jit`. The family differences are switches: q/k/v bias (Qwen2), per-head q/k RMSNorm (Qwen3,
Gemma 3), the RoPE frequency rule (Llama-3 or linear scaling), and Gemma 3's set: sliding-window
layers with their own RoPE base (`layer_types`), norms around both the attention and the MLP
output, RMSNorm weights stored as an offset from 1, embeddings scaled by sqrt(hidden), GELU-tanh,
an attention scale from `query_pre_attn_scalar` and optional final logit soft-capping.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text")
SLIDING, FULL = "sliding_attention", "full_attention"
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}


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
    hidden_act: str = "silu"  # or "gelu_pytorch_tanh"
    # Gemma 3: per-layer SLIDING / FULL (None: every layer full); sliding layers see the last
    # `sliding_window` positions (their own included) and use `local_rope_theta`, unscaled.
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    local_rope_theta: float | None = None
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma 3)
    norm_offset: bool = False  # RMSNorm scales by (1 + w), in f32 (Gemma)
    scale_embeddings: bool = False  # embeddings times sqrt(hidden), in the compute dtype (Gemma)
    query_pre_attn_scalar: float | None = None  # attention scale 1/sqrt(this) instead of 1/sqrt(head_dim)
    final_logit_softcap: float | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise MixsdError(
                f"unsupported model_type {self.model_type!r} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if self.num_heads % self.num_kv_heads:
            raise MixsdError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or set(self.layer_types) - {SLIDING, FULL}:
                raise MixsdError(
                    f"layer_types must name {SLIDING!r} or {FULL!r} for each of the {self.num_layers} layers")
            if SLIDING in self.layer_types and not (self.sliding_window and self.sliding_window > 0):
                raise MixsdError("sliding-window layers need a positive sliding_window")

    @property
    def has_sliding_layers(self) -> bool:
        return self.layer_types is not None and SLIDING in self.layer_types

    @property
    def attention_divisor(self) -> float:
        """Attention scores are divided by this: sqrt(head_dim), or sqrt(query_pre_attn_scalar)."""
        return math.sqrt(self.query_pre_attn_scalar or self.head_dim)

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

        gemma = model_type == "gemma3_text"
        act = hf.get("hidden_activation", hf.get("hidden_act")) if gemma else hf.get("hidden_act", "silu")
        if act != ("gelu_pytorch_tanh" if gemma else "silu"):
            raise MixsdError(f"{source}: unsupported hidden activation {act!r} for {model_type}")
        if hf.get("use_sliding_window"):
            raise MixsdError(f"{source}: sliding-window attention is not supported for {model_type}")
        for key in ("mlp_bias", "attn_logit_softcapping", "use_bidirectional_attention"):
            if hf.get(key):
                raise MixsdError(f"{source}: {key}={hf[key]!r} is not supported")
        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        rope = dict(hf.get("rope_parameters") or {})
        if gemma:
            # transformers v5 writes one rope_parameters entry per layer type; v4 wrote rope_theta,
            # rope_local_base_freq and rope_scaling (which applies to the full layers only).
            full = {"rope_theta": hf.get("rope_theta", 1e6), **(hf.get("rope_scaling") or {}), **(rope.get(FULL) or {})}
            local = {"rope_theta": hf.get("rope_local_base_freq", 10000.0), **(rope.get(SLIDING) or {})}
            rope_theta, scaling = _rope(full, source)
            if _rope(local, source)[1] is not None:
                raise MixsdError(f"{source}: RoPE scaling on sliding-window layers is not supported")
            layers = need("num_hidden_layers")
            pattern = int(hf.get("sliding_window_pattern") or 6)
            layer_types = hf.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]
            gemma_fields = dict(
                layer_types=tuple(layer_types), sliding_window=need("sliding_window"),
                local_rope_theta=float(local["rope_theta"]), sandwich_norms=True, norm_offset=True,
                scale_embeddings=True, query_pre_attn_scalar=float(need("query_pre_attn_scalar")),
                final_logit_softcap=hf.get("final_logit_softcapping"), hidden_act=act,
            )
        else:
            # transformers v5 writes `rope_parameters`; v4 wrote `rope_theta` + `rope_scaling`.
            legacy = hf.get("rope_scaling") or {}
            merged = {**legacy, **rope, "rope_theta": rope.get("rope_theta", hf.get("rope_theta", 10000.0))}
            rope_theta, scaling = _rope(merged, source)
            gemma_fields = {}
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
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            **gemma_fields,
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
        rope: dict = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
        out = {
            "architectures": [ARCHITECTURES[self.model_type]],
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
        if self.model_type == "gemma3_text":
            del out["hidden_act"], out["rope_theta"]
            out.pop("rope_scaling", None)
            local = {"rope_theta": self.local_rope_theta, "rope_type": "default"}
            out.update(hidden_activation=self.hidden_act, layer_types=list(self.layer_types),
                       sliding_window=self.sliding_window,
                       # transformers' Gemma3TextConfig validates it as an int
                       query_pre_attn_scalar=int(self.query_pre_attn_scalar)
                       if float(self.query_pre_attn_scalar).is_integer() else self.query_pre_attn_scalar,
                       final_logit_softcapping=self.final_logit_softcap, attn_logit_softcapping=None,
                       rope_parameters={FULL: rope, SLIDING: local})
        return out


def _rope(params: dict, source: str) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from one rope_parameters (or legacy rope_scaling) dict."""
    rope_theta = float(params.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return rope_theta, None
    if rope_type not in ("linear", "llama3"):
        raise MixsdError(f"{source}: unsupported rope type {rope_type!r} (default, linear, llama3)")
    return rope_theta, RopeScaling(
        rope_type=rope_type,
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )
