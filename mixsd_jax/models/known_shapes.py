"""Architecture fields of the paper's models, as in their Hugging Face config.json files.

Enough to build a `ModelConfig` (shapes, no weights), so memory plans of the paper's configs need
no download. Keys follow PAPER_MODELS in registry.py. Values are the published config.json fields
(Qwen/Qwen3-1.7B, Qwen/Qwen3-4B-Instruct-2507, Qwen/Qwen3-8B, meta-llama/Llama-3.2-1B-Instruct).
"""

from __future__ import annotations

from mixsd_jax.models.config import ModelConfig

_QWEN3 = {"model_type": "qwen3", "vocab_size": 151936, "head_dim": 128, "num_key_value_heads": 8,
          "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False}

HF_CONFIGS = {
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
}


def known_model_config(name: str) -> ModelConfig | None:
    """The ModelConfig of a paper model by registry name or HF id, or None for any other name."""
    from mixsd_jax.models.registry import PAPER_MODELS

    name = {hf_id: n for n, hf_id in PAPER_MODELS.items()}.get(name, name)
    hf = HF_CONFIGS.get(name)
    return None if hf is None else ModelConfig.from_hf_dict(hf, source=f"known shapes of {name}")
