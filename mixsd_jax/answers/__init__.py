"""Whether an answer is right: text extraction (`text`), the reference scorer (`scoring`), the run's
answer criteria (`criteria`) and the MixSD generator's verifier (`verifier`). Pure Python on the
ground floor: `data`, `sampling` and `eval` judge answers by the same rules."""
