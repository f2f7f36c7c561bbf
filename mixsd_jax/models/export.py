"""Any checkpoint of a finished or running training directory -> an HF-format model directory.

Everything needed is in the checkpoint's `meta` (the full config, hence the base model and its
tokenizer), so exporting needs only the run's output directory. Only the parameters are read back
(an Orbax partial restore of `state.params`): the optimizer state is never materialised, and this
module needs nothing of `train` — it lives here, next to HF import and `export_hf`, so evaluation
can export checkpoints without importing the trainer.
"""

from __future__ import annotations

from pathlib import Path

from mixsd_jax import config as config_lib
from mixsd_jax import storage
from mixsd_jax.errors import MixsdError


def export_checkpoint(out_dir: str | Path, step: int | None = None, dest: str | Path | None = None) -> Path:
    """Export checkpoint `step` (default: the latest) of the run in `out_dir`; returns the directory
    written: `dest`, else `out_dir/hf` for the latest step and `out_dir/exports/step_N` otherwise."""
    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from mixsd_jax.models.checkpoint import export_hf
    from mixsd_jax.models.config import ModelConfig
    from mixsd_jax.models.registry import resolve_model
    from mixsd_jax.models.sharding import MeshConfig, make_mesh, param_shardings
    from mixsd_jax.models.transformer import param_shapes

    out_dir = storage.path(out_dir)  # Orbax reads a URL itself
    if not (out_dir / "checkpoints").is_dir():
        raise MixsdError(f"{out_dir}: no checkpoints/ directory (not a training output directory)")
    manager = ocp.CheckpointManager(out_dir / "checkpoints", item_names=("state", "meta"),
                                    options=ocp.CheckpointManagerOptions(create=False, read_only=True))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise MixsdError(f"{out_dir}/checkpoints: no checkpoint saved yet")
        latest = steps[-1]
        step = latest if step is None else step
        if step not in steps:
            raise MixsdError(f"{out_dir}/checkpoints: no checkpoint at step {step} (saved: {steps})")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        run = meta["config"]
        model_dir = resolve_model(run["model"])
        model_cfg = ModelConfig.from_hf_dir(model_dir)
        # The run's mesh if this machine can build it, else every device on `data` (replicated).
        try:
            mesh = make_mesh(config_lib.from_dict(MeshConfig, run.get("mesh", {}), prefix="mesh."))
        except MixsdError:
            mesh = make_mesh(MeshConfig())
        dtype = jnp.dtype(run.get("param_dtype", "float32"))
        shardings = param_shardings(model_cfg, mesh)
        abstract = jax.tree.map(
            lambda shape, sharding: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding),
            param_shapes(model_cfg), shardings, is_leaf=lambda x: isinstance(x, tuple),
        )
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": abstract},
            restore_args={"params": ocp.checkpoint_utils.construct_restore_args(abstract)},
            partial_restore=True,
        )))
    finally:
        manager.close()
    if dest is None:
        dest = out_dir / "hf" if step == latest else out_dir / "exports" / f"step_{step}"
    export_hf(restored["state"]["params"], model_cfg, dest, tokenizer_dir=model_dir,
              dtype=run.get("export_dtype", "float32"))
    return storage.path(dest)
