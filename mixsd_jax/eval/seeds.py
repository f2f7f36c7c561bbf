"""A method's numbers over its training seeds: mean and a 95% t-interval across seeded runs.

Item intervals (Wilson, bootstrap) say how sure a number is for one trained model; this one says
how much it moves when the model is trained again with another seed (and, for MixSD, its targets
generated again with another seed), which at a few dozen facts is often the larger of the two.
"""

from __future__ import annotations

import math
from typing import Sequence

# Two-sided 95% Student-t quantiles by degrees of freedom (beyond the table: the normal's 1.96).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         15: 2.131, 20: 2.086, 30: 2.042}


def t_quantile(df: int) -> float:
    if df in _T975:
        return _T975[df]
    known = [d for d in _T975 if d <= df]
    return _T975[max(known)] if df <= 30 else 1.96


def mean_interval(values: Sequence[float]) -> dict:
    """Mean and 95% t-interval of per-seed values (no interval from a single seed)."""
    values = [float(v) for v in values if v is not None]
    k = len(values)
    if k == 0:
        return {"mean": None, "ci95": [None, None], "seeds": 0, "values": []}
    mean = sum(values) / k
    if k == 1:
        return {"mean": mean, "ci95": [None, None], "seeds": 1, "values": values}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (k - 1))
    half = t_quantile(k - 1) * sd / math.sqrt(k)
    return {"mean": mean, "ci95": [mean - half, mean + half], "seeds": k, "values": values}


def run_metrics(results: dict, name: str) -> dict[str, float | None]:
    """The headline numbers of one checkpoint in an evaluator's results."""
    out: dict[str, float | None] = {}
    mem = (results.get("memorization") or {}).get(name)
    if mem:
        out["memorization"] = mem["mean"]
        if "reference_mean" in mem:
            out["memorization (reference scorer)"] = mem["reference_mean"]
        for split, block in mem["splits"].items():
            out[split] = block["accuracy"]
        if "trained_recall" in mem:
            out["recall on its trained facts"] = mem["trained_recall"]["accuracy"]
    ret = (results.get("retention") or {}).get(name)
    if ret:
        out["retention"] = ret["mean"]
    held = (results.get("heldout") or {}).get(name)
    if held:
        out["leakage rate"] = held["leakage"]["rate"]
        out["template rate"] = held["template"]["rate"]
        own = held.get("opens_like", {}).get(name)
        if own:
            out["opens-like-own-targets rate"] = own["rate"]
    kl = (results.get("kl") or {}).get(name)
    if kl:
        out["KL(base‖tuned) /token"] = kl["kl_token_mean"]
    return out


def over_seeds(results: dict, groups: dict[str, list[str]]) -> dict:
    """{group: {metric: mean_interval over the group's runs}} for every metric all runs have."""
    out = {}
    for group, members in groups.items():
        per_run = [run_metrics(results, m) for m in members]
        keys = [k for k in per_run[0] if all(k in r for r in per_run)] if per_run else []
        out[group] = {"runs": list(members), **{k: mean_interval([r[k] for r in per_run]) for k in keys}}
    return out
