"""The checkpoints an evaluation compares: the base model and each tuned one, resolved to HF directories."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.errors import MixsdError
from mixsd_jax.eval.config import BASE, EvalConfig, split_named


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    name: str
    label: str
    source: str  # as given
    model_dir: Path  # HF-format directory


def resolve_checkpoint(path: str, export: bool = True) -> Path:
    """An HF dir as is; a training run dir → its `hf/` export, else its latest Orbax checkpoint exported."""
    p = storage.path(path)
    if (p / "config.json").is_file():
        return p
    if (p / "hf" / "config.json").is_file():
        return p / "hf"
    if (p / "checkpoints").is_dir():
        if not export:
            return p / "hf"
        from mixsd_jax.models.export import export_checkpoint

        return export_checkpoint(p)
    if not p.exists():
        raise MixsdError(f"{p}: checkpoint not found")
    raise MixsdError(f"{p}: not an HF model directory (config.json) or a training run directory (hf/ or checkpoints/)")


_ARCH_IGNORED = ("bos_token_id", "eos_token_id", "max_position_embeddings")


def check_same_architecture(base_dir: Path, tuned_dir: Path, name: str) -> None:
    from mixsd_jax.models.config import ModelConfig

    base, tuned = ModelConfig.from_hf_dir(base_dir), ModelConfig.from_hf_dir(tuned_dir)
    for field in dataclasses.fields(base):
        if field.name in _ARCH_IGNORED:
            continue
        a, b = getattr(base, field.name), getattr(tuned, field.name)
        if a != b:
            raise MixsdError(
                f"checkpoint {name!r} ({tuned_dir}) has another architecture than the base ({base_dir}): "
                f"{field.name} {b!r} vs {a!r}"
            )


def checkpoints(cfg: EvalConfig) -> list[Checkpoint]:
    from mixsd_jax.models.registry import resolve_model

    labels = dict(split_named(e, "labels") for e in cfg.labels)
    base_dir = resolve_model(cfg.base)
    out = [Checkpoint(BASE, labels.get(BASE, "base"), cfg.base, base_dir)]
    for entry in cfg.tuned:
        name, path = split_named(entry, "tuned")
        model_dir = resolve_checkpoint(path)
        check_same_architecture(base_dir, model_dir, name)
        out.append(Checkpoint(name, labels.get(name, name), path, model_dir))
    return out
