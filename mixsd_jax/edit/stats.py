"""Second moments C = E[k kᵀ] of the MLP down-projection inputs, per model and layer, cached.

MEMIT weighs its update against how the layer's keys are spread in ordinary text (the reference:
100k wikitext samples, positions capped at 512). Offline we read the project's bundled benchmark
texts instead: the LAMBADA passages (novel prose, the closest to wikitext; ~18k tokens for
SmolLM2's tokenizer) then the GSM8K test questions and worked answers (~50k), in file order, packed
into rows of `stats_seq_len` tokens (each text its own segment), up to `stats_tokens` tokens.

The cache key is a content hash of the model's weights and tokenizer files, the layer, the corpus
texts and the token budget; one file per layer under `MIXSD_CACHE/memit_stats/`, so the first edit
of a model pays for the pass and later ones (other facts, other layer bands) reuse it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax import files
from mixsd_jax.models import transformer
from mixsd_jax.models.block import embed

BENCHMARKS = Path(__file__).resolve().parents[1] / "resources" / "benchmarks"
# (file, JSON fields joined into one text), in reading order.
STATS_SOURCES = (("lambada/lambada_test.jsonl", ("text",)), ("gsm8k/test.jsonl", ("question", "answer")))
ROWS = 4  # rows per forward: [L, 4, 512, F] taps stay a few hundred MB for a small model
_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")


def corpus_texts() -> list[str]:
    texts = []
    for name, keys in STATS_SOURCES:
        for _, obj in files.iter_jsonl(BENCHMARKS / name):
            texts.append("\n".join(str(obj[k]) for k in keys))
    return texts


def _hash_files(paths) -> str:
    h = hashlib.sha256()
    for path in sorted(paths):
        h.update(path.name.encode())
        h.update(files.sha256_file(path).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=8)
def model_hash(model_dir: str) -> str:
    root = Path(model_dir)
    paths = [p for p in root.iterdir() if p.suffix == ".safetensors" or p.name in _MODEL_FILES]
    return _hash_files(paths)


def stats_key(model_dir: str | Path, layer: int, stats_tokens: int, seq_len: int) -> str:
    corpus = hashlib.sha256(json.dumps(corpus_texts()).encode()).hexdigest()
    text = json.dumps([model_hash(str(Path(model_dir).resolve())), layer, corpus, stats_tokens, seq_len])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def stats_path(key: str) -> Path:
    return files.cache_dir() / "memit_stats" / f"{key}.npz"


def pack_rows(tokenizer, texts: list[str], seq_len: int, budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Texts tokenized (special tokens as the tokenizer adds them) and packed into [N, seq_len] rows,
    each text its own segment (cut at the row end), at most `budget` tokens in all."""
    rows, segs = [], []
    row, seg, used, segment = [], [], 0, 0
    for text in texts:
        ids = list(tokenizer.hf.encode(text))[:seq_len][:budget - used]
        if not ids:
            break
        if len(row) + len(ids) > seq_len:
            rows.append(row)
            segs.append(seg)
            row, seg, segment = [], [], 0
        segment += 1
        row += ids
        seg += [segment] * len(ids)
        used += len(ids)
    if row:
        rows.append(row)
        segs.append(seg)
    tokens = np.zeros((len(rows), seq_len), np.int32)
    segment_ids = np.zeros((len(rows), seq_len), np.int32)
    for i, (r, s) in enumerate(zip(rows, segs)):
        tokens[i, :len(r)] = r
        segment_ids[i, :len(s)] = s
    return tokens, segment_ids


@functools.partial(jax.jit, static_argnames=("cfg", "layers"))
def moment_sums(params, cfg, layers: tuple[int, ...], tokens_BxT, segment_ids_BxT):
    """Σ k kᵀ over the real tokens of a batch, per layer: [len(layers), F, F]."""
    # Only the layers up to the last edited one run: the keys of the layers above are not needed.
    x = embed(params, cfg, tokens_BxT, jnp.float32)
    _, taps = transformer.run_layer_range(params, cfg, x, segment_ids_BxT, 0, max(layers) + 1, taps=True)
    keys_NxBxTxF = taps["mlp_in"][jnp.asarray(layers)]
    real = (segment_ids_BxT != 0).astype(jnp.float32)
    keys = keys_NxBxTxF.astype(jnp.float32) * real[None, :, :, None]
    # One contracted dim (tokens flattened): XLA:CPU leaves its fast matmul path for two.
    keys_NxKxF = keys.reshape(keys.shape[0], -1, keys.shape[-1])
    return jnp.einsum("nkf,nkg->nfg", keys_NxKxF, keys_NxKxF, preferred_element_type=jnp.float32)


def second_moments(params, cfg, tokenizer, model_dir, layers: tuple[int, ...], stats_tokens: int, seq_len: int,
                   log=print, progress: bool = False) -> dict[int, np.ndarray]:
    """{layer: C [F, F] float32}; reads cached layers and computes the rest in one pass over the corpus."""
    from tqdm import tqdm

    keys = {layer: stats_key(model_dir, layer, stats_tokens, seq_len) for layer in layers}
    out = {}
    for layer, key in keys.items():
        if stats_path(key).is_file():
            with np.load(stats_path(key)) as cached:
                out[layer] = cached["mom2"]
    missing = tuple(layer for layer in layers if layer not in out)
    if not missing:
        return out
    tokens, segment_ids = pack_rows(tokenizer, corpus_texts(), seq_len, stats_tokens)
    count = int((segment_ids != 0).sum())
    log(f"memit: second moments of layers {list(missing)} over {count} corpus tokens ({len(tokens)} rows)")
    total = None
    for start in tqdm(range(0, len(tokens), ROWS), desc="memit second moments", unit="batch", disable=not progress):
        chunk_t, chunk_s = tokens[start:start + ROWS], segment_ids[start:start + ROWS]
        if len(chunk_t) < ROWS:  # one shape for every call; empty rows add nothing
            pad = ROWS - len(chunk_t)
            chunk_t = np.pad(chunk_t, ((0, pad), (0, 0)))
            chunk_s = np.pad(chunk_s, ((0, pad), (0, 0)))
        sums = moment_sums(params, cfg, missing, jnp.asarray(chunk_t), jnp.asarray(chunk_s))
        total = sums if total is None else total + sums
    moments = np.asarray(total) / count
    for i, layer in enumerate(missing):
        path = stats_path(keys[layer])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, mom2=moments[i], count=count)
        tmp.replace(path)
        out[layer] = moments[i]
    return out
