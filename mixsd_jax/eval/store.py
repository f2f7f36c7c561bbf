"""Resumable rows: fingerprints of what determines a unit's rows, and the `items/` folder they live in.

Each (checkpoint, unit) writes its per-item rows to `items/<checkpoint>/<unit>.jsonl` (atomically,
when done) next to `<unit>.meta.json` holding the fingerprint of the unit's settings, the data
files' bytes and the checkpoint's identity. Rows whose fingerprint matches are read back.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.eval.config import BASE
from mixsd_jax.files import atomic_write_json, atomic_write_jsonl, content_hash, iter_jsonl


def model_identity(model_dir: Path) -> str:
    """Config bytes plus the weight files' names and content hashes: the same model is the same
    identity on every host and in every folder (files.content_hash keeps big files cheap)."""
    model_dir = storage.path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors"), key=lambda f: f.name):
        h.update(f"{f.name}:{content_hash(f)}".encode())
    return h.hexdigest()[:16]


def files_digest(paths) -> str:
    """The names and bytes of data files, so a changed file recomputes the units that read it (not
    their places: hosts with the data, or the package, elsewhere agree)."""
    h = hashlib.sha256()
    for p in sorted(str(p) for p in paths):
        h.update(storage.path(p).name.encode())
        h.update(storage.path(p).read_bytes())
    return h.hexdigest()[:16]


def unit_fingerprint(unit, identities: dict[str, str]) -> str:
    """A `units.Unit`'s fingerprint: its name and settings, its checkpoint's identity (KL and Fisher
    compare with the base, so theirs includes the base's)."""
    parts = {"unit": unit.name, "settings": unit.settings, "model": identities[unit.checkpoint]}
    if unit.name in ("kl", "fisher"):
        parts["base"] = identities[BASE]
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class UnitStore:
    """`items/<checkpoint>/<unit>.jsonl` and its `.meta.json`, under an evaluation's output folder."""

    def __init__(self, out_dir: Path):
        self.root = out_dir / "items"

    def paths(self, checkpoint: str, unit: str) -> tuple[Path, Path]:
        folder = self.root / checkpoint
        return folder / f"{unit}.jsonl", folder / f"{unit}.meta.json"

    def load(self, checkpoint: str, unit: str, fingerprint: str) -> list[dict] | None:
        rows_path, meta_path = self.paths(checkpoint, unit)
        if not (rows_path.is_file() and meta_path.is_file()):
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            return None
        if meta.get("fingerprint") != fingerprint:
            return None
        return [row for _, row in iter_jsonl(rows_path)]

    def save(self, checkpoint: str, unit: str, fingerprint: str, rows: list[dict], seconds: float) -> None:
        rows_path, meta_path = self.paths(checkpoint, unit)
        meta_path.unlink(missing_ok=True)  # rows first, then the meta that vouches for them
        atomic_write_jsonl(rows_path, rows)
        atomic_write_json(meta_path, {"fingerprint": fingerprint, "rows": len(rows), "seconds": round(seconds, 2)})
