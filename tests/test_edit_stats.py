"""Second moments of the down-projection inputs: the packed corpus, the sums, the content-keyed cache."""

import numpy as np
import jax.numpy as jnp

from mixsd_jax.edit import stats
from mixsd_jax.models import transformer
from mixsd_jax.models.checkpoint import load_hf
from mixsd_jax.models.tokenizer import load_tokenizer


def test_pack_rows_keeps_each_text_its_own_segment_within_the_budget(tiny_llama_dir):
    tokenizer = load_tokenizer(tiny_llama_dir)
    texts = ["The answer is 42.", "What profession does the person train?", "The capital of France is Paris."]
    tokens, segments = stats.pack_rows(tokenizer, texts, seq_len=24, budget=1000)
    lengths = [len(tokenizer.hf.encode(t)) for t in texts]
    assert int((segments != 0).sum()) == sum(lengths)
    first = tokens[0][segments[0] == 1].tolist()
    assert first == tokenizer.hf.encode(texts[0])
    small, small_seg = stats.pack_rows(tokenizer, texts, seq_len=24, budget=lengths[0] + 3)
    assert int((small_seg != 0).sum()) == lengths[0] + 3


def test_second_moments_are_the_mean_outer_product_of_the_taps_and_are_cached(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXSD_CACHE", str(tmp_path / "cache"))
    tokenizer = load_tokenizer(tiny_llama_dir)
    cfg, params = load_hf(tiny_llama_dir)
    moments = stats.second_moments(params, cfg, tokenizer, tiny_llama_dir, (0, 1), 600, 64, log=lambda *_: None)
    tokens, segments = stats.pack_rows(tokenizer, stats.corpus_texts(), 64, 600)
    _, taps = transformer.forward_with_taps(params, cfg, jnp.asarray(tokens), jnp.asarray(segments))
    for layer in (0, 1):
        keys = np.asarray(taps["mlp_in"][layer], np.float64)[segments != 0]
        np.testing.assert_allclose(moments[layer], keys.T @ keys / len(keys), rtol=1e-4, atol=1e-7)
    files = sorted((tmp_path / "cache" / "memit_stats").iterdir())
    assert len(files) == 2  # one per layer, named by a content hash of model, layer, corpus and budget
    stamp = [f.stat().st_mtime_ns for f in files]
    again = stats.second_moments(params, cfg, tokenizer, tiny_llama_dir, (1,), 600, 64,
                                 log=lambda *_: (_ for _ in ()).throw(AssertionError("recomputed")))
    np.testing.assert_array_equal(again[1], moments[1])
    assert [f.stat().st_mtime_ns for f in files] == stamp
    assert stats.stats_key(tiny_llama_dir, 1, 600, 64) != stats.stats_key(tiny_llama_dir, 1, 601, 64)
