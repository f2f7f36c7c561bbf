"""`mixsd demo`: the pipeline on the embedded default model with a small KGFact corpus and the
bundled retention subsets, sized for a 2-core CPU (configs/demo.yaml, configs/demo_quick.yaml)."""

from __future__ import annotations

from pathlib import Path

from mixsd_jax.errors import MixsdError
from mixsd_jax.pipeline.config import ExperimentConfig, load_experiment

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def demo_config_path(quick: bool) -> Path:
    path = CONFIG_DIR / ("demo_quick.yaml" if quick else "demo.yaml")
    if not path.is_file():
        raise MixsdError(f"{path}: demo config not found (run the demo from a checkout of the repository)")
    return path


def demo_config(quick: bool = False, out: str | None = None, overrides=()) -> ExperimentConfig:
    flags = [f"out_dir={out}"] if out else []
    return load_experiment(demo_config_path(quick), [*overrides, *flags])
