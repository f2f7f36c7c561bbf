"""`mixsd pipeline` and `mixsd demo`: corpus → MixSD targets per λ → one training run per method →
evaluation → report, each stage skipped when its outputs exist with the same fingerprint."""
