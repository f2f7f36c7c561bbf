"""Any checkpoint of a finished or running training directory -> an HF-format model directory.

Everything needed is in the checkpoint's `meta` (the full config, hence the base model and its
tokenizer), so exporting needs only the run's output directory.
"""

from __future__ import annotations

from pathlib import Path

from mixsd_jax import config as config_lib
from mixsd_jax.errors import MixsdError
from mixsd_jax.train.config import TrainConfig


def export_checkpoint(out_dir: str | Path, step: int | None = None, dest: str | Path | None = None) -> Path:
    """Export checkpoint `step` (default: the latest) of the run in `out_dir`; returns the directory
    written: `dest`, else `out_dir/hf` for the latest step and `out_dir/exports/step_N` otherwise."""
    from mixsd_jax.models.checkpoint import export_hf
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.sharding import MeshConfig, make_mesh
    from mixsd_jax.train import step as step_lib
    from mixsd_jax.train.checkpoints import Checkpoints

    out_dir = Path(out_dir)
    if not (out_dir / "checkpoints").is_dir():
        raise MixsdError(f"{out_dir}: no checkpoints/ directory (not a training output directory)")
    ckpt = Checkpoints(out_dir / "checkpoints")
    try:
        steps = ckpt.all_steps()
        if not steps:
            raise MixsdError(f"{out_dir}/checkpoints: no checkpoint saved yet")
        latest = max(steps)
        step = latest if step is None else step
        if step not in steps:
            raise MixsdError(f"{out_dir}/checkpoints: no checkpoint at step {step} (saved: {sorted(steps)})")
        meta = ckpt.read_meta(step)
        cfg = config_lib.from_dict(TrainConfig, meta["config"])
        model_dir = resolve_model(cfg.model)
        model_cfg = ModelConfig.from_hf_dir(model_dir)
        # The run's mesh if this machine can build it, else every device on `data` (replicated).
        try:
            mesh = make_mesh(cfg.mesh)
        except MixsdError:
            mesh = make_mesh(MeshConfig())
        opt = step_lib.OptimConfig.from_train_config(cfg, int(meta.get("total_steps", step)))
        tx = step_lib.make_optimizer(opt)
        shardings = step_lib.state_shardings(model_cfg, tx, mesh)
        state, _ = ckpt.restore(step, step_lib.abstract_state(model_cfg, tx, shardings, cfg.param_dtype))
    finally:
        ckpt.close()
    if dest is None:
        dest = out_dir / "hf" if step == latest else out_dir / "exports" / f"step_{step}"
    export_hf(state["params"], model_cfg, dest, tokenizer_dir=model_dir, dtype=cfg.export_dtype)
    return Path(dest)
