"""Architecture fields of the paper's models, as in their Hugging Face config.json files.

Enough to build a `ModelConfig` (shapes, no weights), so memory plans of the paper's configs need
no download. Keys follow PAPER_MODELS, EMBEDDED and GEMMA3_MODELS in registry.py. Values are the
published config.json fields (Qwen/Qwen3-1.7B, Qwen/Qwen3-4B-Instruct-2507, Qwen/Qwen3-8B,
meta-llama/Llama-3.2-1B-Instruct,
meta-llama/Llama-3.2-3B-Instruct, google/gemma-3-270m, google/gemma-3-1b-pt, and the `text_config`
of google/gemma-3-4b-pt, -12b-pt, -27b-pt).
"""

from __future__ import annotations

from mixsd_jax.models.config import ModelConfig

_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False}

_GEMMA3 = {"model_type": "gemma3_text", "head_dim": 256, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-6,
           "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
           "sliding_window_pattern": 6, "tie_word_embeddings": True, "final_logit_softcapping": None,
           "attn_logit_softcapping": None}
_GEMMA3_SMALL = {**_GEMMA3, "vocab_size": 262144, "sliding_window": 512, "num_attention_heads": 4,
                 "num_key_value_heads": 1, "max_position_embeddings": 32768}
_GEMMA3_LARGE = {**_GEMMA3, "vocab_size": 262208, "sliding_window": 1024, "max_position_embeddings": 131072,
                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}}

HF_CONFIGS = {
    "gemma3-270m": {**_GEMMA3_SMALL, "hidden_size": 640, "intermediate_size": 2048, "num_hidden_layers": 18},
    "gemma3-1b": {**_GEMMA3_SMALL, "hidden_size": 1152, "intermediate_size": 6912, "num_hidden_layers": 26},
    "gemma3-4b": {**_GEMMA3_LARGE, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
                  "num_attention_heads": 8, "num_key_value_heads": 4},
    "gemma3-12b": {**_GEMMA3_LARGE, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
                   "num_attention_heads": 16, "num_key_value_heads": 8},
    "gemma3-27b": {**_GEMMA3_LARGE, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
                   "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128,
                   "query_pre_attn_scalar": 168},
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "tie_word_embeddings": True, "rope_theta": 1000000,
                   "max_position_embeddings": 40960},
    "qwen3-1.7b": {**_QWEN3, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "tie_word_embeddings": True, "rope_theta": 1000000,
                   "max_position_embeddings": 40960},
    "qwen3-4b-instruct-2507": {**_QWEN3, "hidden_size": 2560, "intermediate_size": 9728, "num_hidden_layers": 36,
                               "num_attention_heads": 32, "tie_word_embeddings": True, "rope_theta": 5000000,
                               "max_position_embeddings": 262144},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "tie_word_embeddings": False, "rope_theta": 1000000,
                 "max_position_embeddings": 40960},
    "llama-3.2-1b-instruct": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072,
    },
    "llama-3.2-3b-instruct": {
        "model_type": "llama", "vocab_size": 128256, "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8, "head_dim": 128,
        "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": True, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192},
        "max_position_embeddings": 131072,
    },
}


def known_model_config(name: str) -> ModelConfig | None:
    """The ModelConfig of a known model by registry name or HF id, or None for any other name."""
    from mixsd_jax.models.registry import LOCAL_MODELS

    name = {**{hf_id: n for n, hf_id in LOCAL_MODELS.items()}, "google/gemma-3-270m": "gemma3-270m"}.get(name, name)
    hf = HF_CONFIGS.get(name)
    return None if hf is None else ModelConfig.from_hf_dict(hf, source=f"known shapes of {name}")
