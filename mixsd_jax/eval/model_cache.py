"""The models of an evaluation: the base kept loaded, one tuned checkpoint at a time, the base Fisher once."""

from __future__ import annotations

from mixsd_jax.eval.checkpoints import Checkpoint
from mixsd_jax.eval.config import BASE, EvalConfig


class Models:
    """The loaded base (kept) and the current checkpoint's parameters; the base Fisher, once."""

    def __init__(self, cfg: EvalConfig, base: Checkpoint, mesh=None):
        from mixsd_jax.models.checkpoint import load_hf
        from mixsd_jax.models.tokenizer import load_tokenizer

        self.eval_cfg, self.mesh = cfg, mesh
        self.tokenizer = load_tokenizer(base.model_dir)
        self.cfg, self.base_params = load_hf(base.model_dir, cfg.param_dtype, mesh=mesh)
        self.current, self.params = BASE, self.base_params
        self._fisher = None

    def use(self, ckpt: Checkpoint) -> None:
        if ckpt.name == self.current:
            return
        from mixsd_jax.models.checkpoint import load_hf

        self.params = None  # free the previous checkpoint before loading the next
        _, self.params = (load_hf(ckpt.model_dir, self.eval_cfg.param_dtype, mesh=self.mesh) if ckpt.name != BASE
                          else (None, self.base_params))
        self.current = ckpt.name

    def fisher(self, texts: list[str], progress):
        if self._fisher is None:
            from mixsd_jax.eval.analyses import diagonal_fisher

            rows = [self.tokenizer.encode(t)[: self.cfg.max_position_embeddings] for t in texts]
            self._fisher = diagonal_fisher(self.base_params, self.cfg, rows, dtype=self.eval_cfg.dtype,
                                           mesh=self.mesh, progress=progress)
        return self._fisher
