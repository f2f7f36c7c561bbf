"""Moved to `mixsd_jax.models.export` (evaluation exports checkpoints too, and must not import the
trainer); this name is kept so existing imports keep working."""

from mixsd_jax.models.export import export_checkpoint  # noqa: F401
