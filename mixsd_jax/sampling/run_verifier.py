"""The MixSD generator's verifier: the run's answer criterion (`mixsd_jax.criteria`) when the
config names one, else the extract-mode verifier of REFERENCE.md §1.6 behind the same interface
(`gt_answer(gt_text, prompt)` once per record, `check(response, gold)` per attempt)."""

from __future__ import annotations

import dataclasses

from mixsd_jax.criteria import Criterion, criterion_for
from mixsd_jax.sampling.verify import Verifier


@dataclasses.dataclass(frozen=True)
class ModeVerifier:
    verifier: Verifier

    def gt_answer(self, gt_text: str, prompt: str = "") -> str | None:
        return self.verifier.gt_answer(gt_text)  # extract modes never look at the prompt

    def check(self, response: str, gold: str | None) -> bool:
        return self.verifier.check(response, gold)


def generation_verifier(criterion: str | None, extract_mode: str, normalized: bool, records) -> Criterion | ModeVerifier:
    """The run's criterion with the records' training entities, else the extract mode's verifier."""
    if criterion is not None:
        return criterion_for(criterion, records)
    return ModeVerifier(Verifier(extract_mode, normalized))
