"""mixsd-jax: MixSD (Mixed Contextual Self-Distillation) knowledge injection in JAX."""

import logging as _logging

__version__ = "0.1.0"


class _NoTorchBanner(_logging.Filter):
    """transformers announces on import that PyTorch is missing; we use it only for tokenizers and
    configs (the commands that do need PyTorch say so themselves), so the banner is noise."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith("PyTorch was not found")


# Set on transformers' library logger before transformers is imported (it logs the banner there).
_logging.getLogger("transformers").addFilter(_NoTorchBanner())
