"""mixsd-jax: MixSD (Mixed Contextual Self-Distillation) knowledge injection in JAX."""

__version__ = "0.1.0"
