"""A method's numbers over its training seeds: mean and a 95% t-interval across seeded runs.

Item intervals (Wilson, bootstrap) say how sure a number is for one trained model; this one says
how much it moves when the model is trained again with another seed (and, for MixSD, its targets
generated again with another seed), which at a few dozen facts is often the larger of the two.
"""

from __future__ import annotations

from mixsd_jax.eval.intervals import seed_mean_interval


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
    """{group: {metric: seed_mean_interval over the group's runs}} for every metric all runs have."""
    out = {}
    for group, members in groups.items():
        per_run = [run_metrics(results, m) for m in members]
        keys = [k for k in per_run[0] if all(k in r for r in per_run)] if per_run else []
        out[group] = {"runs": list(members), **{k: seed_mean_interval([r[k] for r in per_run]) for k in keys}}
    return out
