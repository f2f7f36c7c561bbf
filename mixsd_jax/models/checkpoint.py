"""HF-format model directories in and out: config.json + (sharded) safetensors.

Loading is shard-aware: each tensor is a lazy `safetensors` slice and every device's block is read
straight from its file by `jax.make_array_from_callback`, so a host only touches the bytes its
devices hold. Export writes safetensors (`safetensors.numpy.save_file`) that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.models.config import ModelConfig
from mixsd_jax.models.gather import host_copy
from mixsd_jax.models.remote_safetensors import ST_DTYPES as _ST_DTYPES
from mixsd_jax.models.remote_safetensors import open_ranged, place_reading_once
from mixsd_jax.models.transformer import Params, param_shapes

_ST_NAMES = {v: k for k, v in _ST_DTYPES.items()}

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


# ----------------------------------------------------------------------------- safetensors


class LazyTensor:
    """One tensor of a safetensors file, read only where it is indexed (`safe_open(...).get_slice`).

    `.T` is a transposed view of the same bytes (HF stores projections [out, in], we keep [in, out]):
    indexing it reads the matching block of the stored tensor and transposes just that block.
    """

    def __init__(self, file_slice, path: Path, name: str, transposed: bool = False):
        self._slice, self._path, self._name, self._transposed = file_slice, path, name, transposed
        stored = tuple(file_slice.get_shape())
        self.shape = tuple(reversed(stored)) if transposed else stored
        dtype = _ST_DTYPES.get(file_slice.get_dtype())
        if dtype is None:
            raise MixsdError(f"{path}: tensor {name!r} has unsupported dtype {file_slice.get_dtype()}")
        self.dtype = dtype

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def T(self) -> "LazyTensor":
        if self.ndim > 2:
            raise ValueError("only 1-D and 2-D tensors are transposed")
        return LazyTensor(self._slice, self._path, self._name, not self._transposed)

    def __getitem__(self, idx) -> np.ndarray:
        idx = idx if isinstance(idx, tuple) else (idx,)
        idx = idx + (slice(None),) * (self.ndim - len(idx))
        if self._transposed:
            return np.asarray(self._slice[tuple(reversed(idx))]).T
        return np.asarray(self._slice[idx])

    def __array__(self, dtype=None, copy=None):
        whole = self[tuple(slice(None) for _ in self.shape)]
        return whole if dtype is None else whole.astype(dtype)


def _open_safetensors(path: Path) -> dict[str, LazyTensor]:
    """Name -> LazyTensor (only the header is read here); a file in a bucket by ranged reads."""
    from safetensors import SafetensorError, safe_open

    if storage.is_url(path):
        return {name: LazyTensor(piece, path, name) for name, piece in open_ranged(path).items()}
    try:
        handle = safe_open(str(path), framework="numpy")
        return {name: LazyTensor(handle.get_slice(name), path, name) for name in handle.keys()}
    except SafetensorError as exc:
        raise MixsdError(f"{path}: not a readable safetensors file ({exc})") from None


def _write_safetensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    from safetensors.numpy import save_file

    # transformers reads `format: pt` as "tensors in PyTorch layout", which these are.
    tensors = {name: np.ascontiguousarray(arr) for name, arr in tensors.items()}
    if storage.is_url(path):  # one upload of the shard's bytes
        from safetensors.numpy import save

        storage.path(path).write_bytes(save(tensors, metadata={"format": "pt"}))
        return
    save_file(tensors, str(path), metadata={"format": "pt"})


def read_hf_tensors(model_dir: str | Path) -> dict[str, LazyTensor]:
    model_dir = storage.path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise MixsdError(f"{model_dir}: no model.safetensors or model.safetensors.index.json")
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        if not (model_dir / name).is_file():
            raise MixsdError(f"{model_dir}: shard {name} listed in the index is missing")
        tensors.update(_open_safetensors(model_dir / name))
    return tensors


# ----------------------------------------------------------------------------- name mapping


def _hf_layer_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our stacked layer param -> (HF per-layer name pattern, transpose?)."""
    names = {
        "attn_norm": ("model.layers.{}.input_layernorm.weight", False),
        "wq": ("model.layers.{}.self_attn.q_proj.weight", True),
        "wk": ("model.layers.{}.self_attn.k_proj.weight", True),
        "wv": ("model.layers.{}.self_attn.v_proj.weight", True),
        "wo": ("model.layers.{}.self_attn.o_proj.weight", True),
        # Llama's "post-attention" norm is the one before the MLP; Gemma 3 names that one
        # pre_feedforward and has a true post-attention norm (below).
        "mlp_norm": ("model.layers.{}.post_attention_layernorm.weight", False),
        "w_gate": ("model.layers.{}.mlp.gate_proj.weight", True),
        "w_up": ("model.layers.{}.mlp.up_proj.weight", True),
        "w_down": ("model.layers.{}.mlp.down_proj.weight", True),
    }
    if cfg.qkv_bias:
        names.update(
            bq=("model.layers.{}.self_attn.q_proj.bias", False),
            bk=("model.layers.{}.self_attn.k_proj.bias", False),
            bv=("model.layers.{}.self_attn.v_proj.bias", False),
        )
    if cfg.qk_norm:
        names.update(
            q_norm=("model.layers.{}.self_attn.q_norm.weight", False),
            k_norm=("model.layers.{}.self_attn.k_norm.weight", False),
        )
    if cfg.sandwich_norms:
        names.update(
            post_attn_norm=("model.layers.{}.post_attention_layernorm.weight", False),
            mlp_norm=("model.layers.{}.pre_feedforward_layernorm.weight", False),
            post_mlp_norm=("model.layers.{}.post_feedforward_layernorm.weight", False),
        )
    return names


def _top_names(cfg: ModelConfig) -> dict[str, tuple[str, bool]]:
    names = {"embed": ("model.embed_tokens.weight", False), "final_norm": ("model.norm.weight", False)}
    if not cfg.tie_word_embeddings:
        names["lm_head"] = ("lm_head.weight", True)
    return names


def _get(tensors: dict, name: str, expected: tuple, transpose: bool, model_dir) -> np.ndarray:
    if name not in tensors:
        raise MixsdError(f"{model_dir}: missing tensor {name!r}")
    arr = tensors[name]
    want = tuple(reversed(expected)) if transpose else tuple(expected)
    if tuple(arr.shape) != want:
        raise MixsdError(f"{model_dir}: tensor {name!r} has shape {tuple(arr.shape)}, expected {want}")
    return arr.T if transpose else arr


# ----------------------------------------------------------------------------- load


def load_hf(
    model_dir: str | Path,
    param_dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
) -> tuple[ModelConfig, Params]:
    """Config and parameters of an HF-format directory, placed by the model's sharding rules."""
    from mixsd_jax.models.sharding import param_shardings

    model_dir = storage.path(model_dir)
    cfg = ModelConfig.from_hf_dir(model_dir)
    tensors = read_hf_tensors(model_dir)
    dtype = np.dtype(jnp.dtype(param_dtype))
    shapes = param_shapes(cfg)
    shardings = param_shardings(cfg, mesh)

    def place(shape, sharding, read: Callable[[tuple], np.ndarray]):
        if sharding is None:
            return jnp.asarray(read(tuple(slice(None) for _ in shape)).astype(dtype))
        return jax.make_array_from_callback(shape, sharding, lambda idx: read(idx).astype(dtype))

    # A bucket is read once per host (each tensor's rows for all local devices together); a local
    # file is memory-mapped, so each device reads its own block from the page cache.
    once = storage.is_url(model_dir) and mesh is not None
    params: dict[str, Any] = {}
    for ours, (hf_name, transpose) in _top_names(cfg).items():
        arr = _get(tensors, hf_name, shapes[ours], transpose, model_dir)
        if once:
            params[ours] = place_reading_once(shapes[ours], shardings[ours], arr, dtype, stacked=False)
            continue
        params[ours] = place(shapes[ours], shardings[ours], lambda idx, a=arr: np.asarray(a[idx]))

    layers: dict[str, Any] = {}
    for ours, (pattern, transpose) in _hf_layer_names(cfg).items():
        shape = shapes["layers"][ours]
        per_layer = [_get(tensors, pattern.format(i), shape[1:], transpose, model_dir) for i in range(cfg.num_layers)]

        def read(idx, per_layer=per_layer):
            layer_ids = range(cfg.num_layers)[idx[0]]
            return np.stack([np.asarray(per_layer[i][idx[1:]]) for i in layer_ids])

        layers[ours] = (place_reading_once(shape, shardings["layers"][ours], per_layer, dtype, stacked=True) if once
                        else place(shape, shardings["layers"][ours], read))
    params["layers"] = layers
    unused = set(tensors) - _expected_hf_names(cfg)
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}
    if unused:
        raise MixsdError(f"{model_dir}: unexpected tensor {sorted(unused)[0]!r} for model_type {cfg.model_type}")
    return cfg, params


def _expected_hf_names(cfg: ModelConfig) -> set[str]:
    names = {n for n, _ in _top_names(cfg).values()}
    for pattern, _ in _hf_layer_names(cfg).values():
        names.update(pattern.format(i) for i in range(cfg.num_layers))
    if cfg.tie_word_embeddings:
        names.add("lm_head.weight")  # some tied checkpoints still store it; it is ignored
    return names


# ----------------------------------------------------------------------------- export


def hf_entries(params: Params, cfg: ModelConfig) -> list[tuple[str, jax.Array, int | None, bool, tuple]]:
    """(HF name, the device array it is cut from, its layer or None, transpose?, its shape) in file
    order. Stacked layer parameters are cut one layer at a time, so a gather never holds more."""
    entries = [(hf_name, params[ours], None, transpose, tuple(params[ours].shape))
               for ours, (hf_name, transpose) in _top_names(cfg).items()]
    for ours, (pattern, transpose) in _hf_layer_names(cfg).items():
        stacked = params["layers"][ours]
        entries += [(pattern.format(i), stacked, i, transpose, tuple(stacked.shape[1:])) for i in range(cfg.num_layers)]
    return entries


def _gathered(source: jax.Array, layer: int | None, transpose: bool, np_dtype, on_gather=None) -> np.ndarray:
    arr = host_copy(source, layer, on_gather).astype(np_dtype)
    return np.ascontiguousarray(arr.T if transpose else arr)


def to_hf_tensors(params: Params, cfg: ModelConfig, dtype: str = "float32") -> dict[str, np.ndarray]:
    np_dtype = np.dtype(jnp.dtype(dtype))
    return {name: _gathered(source, layer, transpose, np_dtype)
            for name, source, layer, transpose, _ in hf_entries(params, cfg)}


def export_is_complete(out_dir: str | Path) -> bool:
    """A local export is renamed into place whole; one in a bucket is whole once its marker is."""
    out_dir = storage.path(out_dir)
    return storage.is_committed(out_dir) and (out_dir / "config.json").is_file()


def export_hf(
    params: Params,
    cfg: ModelConfig,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    dtype: str = "float32",
    shard_bytes: int = 4 << 30,
    on_gather: Callable[[], None] | None = None,
) -> Path:
    """Write an HF-format directory. Every process takes part (the gathers are collectives): each
    tensor is gathered alone, a stacked parameter one layer at a time, and process 0 writes a
    shard file as soon as it is full, so devices hold one layer's gathered weights beyond the
    sharded state and the host one output shard. Locally the files go to a temp folder renamed
    into place; in a bucket, where nothing renames, into the folder itself and a marker last.
    `on_gather()` runs while each gathered tensor is on the devices (models/gather.py)."""
    out_dir = storage.path(out_dir)
    np_dtype = np.dtype(jnp.dtype(dtype))
    entries = hf_entries(params, cfg)
    # Shard boundaries from the shapes alone, identical on every process.
    sizes = [int(np.prod(shape)) * np_dtype.itemsize for *_, shape in entries]
    plan: list[list[int]] = [[]]
    size = 0
    for i, nbytes in enumerate(sizes):
        if size and size + nbytes > shard_bytes:
            plan.append([])
            size = 0
        plan[-1].append(i)
        size += nbytes
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors" for i in range(len(plan))])
    primary = jax.process_index() == 0
    target = _export_target(out_dir) if primary else None
    try:
        for fname, members in zip(names, plan):
            shard = {entries[i][0]: _gathered(*entries[i][1:4], np_dtype, on_gather) for i in members}
            if primary:
                _write_safetensors(target / fname, shard)
            del shard
        if primary:
            _finish_export(target, out_dir, cfg, dtype, names, plan, entries, sizes, tokenizer_dir)
    except BaseException:
        if primary and not storage.is_url(out_dir):
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out_dir


def _export_target(out_dir):
    """Where process 0 writes the files: a temp folder next to a local target, the bucket folder
    itself (emptied, its marker first) for a URL."""
    if storage.is_url(out_dir):
        storage.remove(out_dir)
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    return storage.path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))


def _finish_export(target, out_dir, cfg, dtype, names, plan, entries, sizes, tokenizer_dir) -> None:
    if len(names) > 1:
        weight_map = {entries[i][0]: fname for fname, members in zip(names, plan) for i in members}
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            src = storage.path(tokenizer_dir) / name
            if src.is_file():
                (target / name).write_bytes(src.read_bytes())
    (target / "config.json").write_text(json.dumps(cfg.to_hf_dict(dtype), indent=2) + "\n")
    _commit_export(target, out_dir)


def _commit_export(target, out_dir) -> None:
    """An export written into `_export_target(out_dir)` made whole: the bucket folder's marker, or
    the local temp folder renamed into place."""
    if storage.is_url(out_dir):
        storage.commit_marker(out_dir).write_text("")
        return
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(target, out_dir)


def copy_export(src: str | Path, out_dir: str | Path) -> Path:
    """`out_dir` made a copy of the complete export `src`, committed as `export_hf` commits: in a
    bucket its objects are copied and the marker written last; on a local disk its files are
    hard-linked (copied across filesystems) into the temp folder renamed into place. An export's
    files are written whole, once, and never edited, so a link shares nothing that changes."""
    src, out_dir = storage.path(src), storage.path(out_dir)
    files = sorted((f for f in src.iterdir() if f.name != storage.COMMIT_MARKER), key=lambda f: f.name)
    target = _export_target(out_dir)
    try:
        for f in files:
            if storage.is_url(out_dir):
                f.copy(target / f.name, overwrite=True)
                continue
            try:
                os.link(f, target / f.name)
            except OSError:
                shutil.copy2(f, target / f.name)
        _commit_export(target, out_dir)
    except BaseException:
        if not storage.is_url(out_dir):
            shutil.rmtree(target, ignore_errors=True)
        raise
    return out_dir
