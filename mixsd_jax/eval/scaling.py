"""The scaling report: several models' evaluator results side by side, by parameter count.

Input: per model its name, parameter count, runs (run, method, label, λ, seed), the evaluator's
results.json and each run's chosen step. Output under `out_dir`:

- `scaling.json`: one row per model × method × seed (and a base row per model), each headline
  metric as {value, ci95} with the run's own 95% item interval; per (model, method) the mean and
  interval over seeds (`summary`); the SFT-vs-MixSD comparisons (`differences`).
- `report.md`: one table per method over sizes, then per size the differences whose intervals do
  not overlap.
- `scaling_<metric>.png`: each headline metric against parameters (log x), one line per method,
  interval bands; `tradeoff_by_size.png`: memorization against each forgetting measure, one column
  per model (small multiples).

Intervals over seeds are the project's (eval/seeds.py: mean and 95% t-interval across seeded runs);
a method with one run keeps that run's item interval (Wilson, bootstrap), and says so.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

from mixsd_jax import storage
from mixsd_jax.eval.intervals import seed_mean_interval
from mixsd_jax.files import atomic_write_json, atomic_write_text

# (key, what the report calls it, True when higher is better)
METRICS = (
    ("memorization", "memorization", True),
    ("trained_recall", "recall on its trained facts", True),
    ("retention", "retention (tuned/base)", True),
    ("leakage", "held-out leakage", False),
    ("template", "held-out template", False),
    ("collapse", "held-out collapse", False),
    ("kl", "KL(base‖tuned) /token", False),
    ("target_nll", "target NLL/token (base)", False),
)
LABELS = {key: label for key, label, _ in METRICS}
FORGETTING = ("retention", "kl", "leakage")  # the trade-off plot's y axes, when measured
PLOT_TRADEOFF = "tradeoff_by_size.png"


def plot_name(metric: str) -> str:
    return f"scaling_{metric}.png"


def _interval(value, ci) -> dict:
    low, high = (ci or [None, None])[:2]
    return {"value": value, "ci95": [low, high]}


def run_metrics(results: dict, run: str) -> dict[str, dict]:
    """{metric: {value, ci95, ...}} of one checkpoint in an evaluator's results."""
    out: dict[str, dict] = {}
    mem = (results.get("memorization") or {}).get(run)
    if mem:
        out["memorization"] = _interval(mem["mean"], mem["ci95"])
        trained = mem.get("trained_recall")
        if trained:
            out["trained_recall"] = {**_interval(trained["accuracy"], trained["ci95"]),
                                     "correct": trained["correct"], "n": trained["n"]}
    ret = (results.get("retention") or {}).get(run)
    if ret and ret.get("mean") is not None:
        ratios = ret["ratios"]
        # The mean of several benchmarks' ratios has no interval of its own; one benchmark's is its ratio's.
        only = next(iter(ratios.values())) if len(ratios) == 1 else None
        out["retention"] = {**_interval(ret["mean"], only["ci95"] if only else None),
                            "benchmarks": {b: _interval(r["ratio"], r["ci95"]) for b, r in ratios.items()}}
    held = (results.get("heldout") or {}).get(run)
    if held:
        for key in ("leakage", "template", "collapse"):
            out[key] = {**_interval(held[key]["rate"], held[key]["ci95"]), "count": held[key]["count"], "n": held["n"]}
    kl = (results.get("kl") or {}).get(run)
    if kl:
        out["kl"] = _interval(kl["kl_token_mean"], kl["ci95"])
    nll = ((results.get("nll") or {}).get("files") or {}).get(run)
    if nll:
        out["target_nll"] = _interval(nll["mean_token_nll"], nll["ci95"])
    return out


def scaling_rows(models: Sequence[dict]) -> list[dict]:
    """One row per model × run (base, then each method's seeded runs), models by parameter count."""
    rows = []
    for model in sorted(models, key=lambda m: m["parameters"]):
        for run in model["runs"]:
            if run["run"] not in model["results"].get("checkpoints", {}):
                continue
            steps = model.get("steps", {}).get(run["run"], {})
            rows.append({
                "model": model["name"], "model_source": model["model"], "model_type": model.get("model_type"),
                "parameters": model["parameters"], "method": run["method"], "label": run["label"],
                "lambda": run["lambda"], "temperature": run["temperature"], "seed": run["seed"], "run": run["run"],
                "chosen_step": steps.get("chosen_step"), "last_step": steps.get("last_step"),
                "metrics": run_metrics(model["results"], run["run"]),
            })
    return rows


def summarize(rows: Sequence[dict]) -> dict[str, dict[str, dict]]:
    """{model: {method: {metric: {mean, ci95, runs, interval}}}}: across seeds when there are
    several runs (t-interval), else the single run's own item interval."""
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(row["model"], {}).setdefault(row["method"], {"rows": []})["rows"].append(row)
    for methods in out.values():
        for method, block in methods.items():
            group = block.pop("rows")
            block["label"] = group[0]["label"]
            block["parameters"] = group[0]["parameters"]
            block["chosen_steps"] = [r["chosen_step"] for r in group]
            for key, _, _ in METRICS:
                values = [r["metrics"][key] for r in group if key in r["metrics"]]
                if len(values) != len(group) or not values:
                    continue
                if len(values) == 1:
                    block[key] = {"mean": values[0]["value"], "ci95": values[0]["ci95"], "runs": 1, "interval": "items"}
                else:
                    seeds = seed_mean_interval([v["value"] for v in values])
                    block[key] = {"mean": seeds["mean"], "ci95": seeds["ci95"], "runs": seeds["seeds"],
                                  "interval": "seeds"}
    return out


def differences(summary: dict) -> list[dict]:
    """Each MixSD method against SFT, per model and metric; `outside`: the two 95% intervals are
    disjoint (a conservative reading: overlapping intervals can still differ)."""
    out = []
    for model, methods in summary.items():
        sft = methods.get("sft")
        if sft is None:
            continue
        for method, block in methods.items():
            if not method.startswith("mixsd"):
                continue
            for key, _, higher_is_better in METRICS:
                a, b = sft.get(key), block.get(key)
                if a is None or b is None or a["mean"] is None or b["mean"] is None:
                    continue
                bounded = None not in (*a["ci95"], *b["ci95"])
                outside = bounded and (b["ci95"][0] > a["ci95"][1] or b["ci95"][1] < a["ci95"][0])
                better = (b["mean"] > a["mean"]) == higher_is_better if b["mean"] != a["mean"] else None
                out.append({"model": model, "parameters": block["parameters"], "method": method,
                            "label": block["label"], "metric": key, "sft": a, "mixsd": b, "outside": bool(outside),
                            "mixsd_better": better})
    return out


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _cell(block: dict | None, digits: int = 3) -> str:
    if block is None or block["mean"] is None:
        return "–"
    low, high = block["ci95"]
    text = _num(block["mean"], digits)
    return text if low is None else f"{text} [{_num(low, digits)}, {_num(high, digits)}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _params(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def render_report(name: str, data: dict, plots: Sequence[str]) -> str:
    summary, models = data["summary"], data["models"]
    parts = [f"# Scaling study: {name}", "", _table(
        ["model", "source", "parameters", "runs evaluated"],
        [[m["name"], f"`{m['model']}`", f"{m['parameters']:,}", str(m["runs"])] for m in models])]
    if data["missing"]:
        parts.append(f"\nNot evaluated yet (no results.json): {', '.join(data['missing'])}.")
    parts.append("\nEach cell: mean and 95% interval. With several seeds the interval is the t-interval across "
                 "seeded runs (eval/seeds.py); with one run it is that run's item interval (Wilson for rates, "
                 "bootstrap for ratios and NLL). `retention` is the tuned/base score ratio (mean over benchmarks).")
    for method in dict.fromkeys(r["method"] for r in data["rows"]):
        blocks = [per_model[method] for per_model in summary.values() if method in per_model]
        present = [key for key, _, _ in METRICS if any(key in block for block in blocks)]
        rows = []
        for model in models:
            block = summary.get(model["name"], {}).get(method)
            if block is None:
                continue
            steps = ", ".join("–" if s is None else str(s) for s in block["chosen_steps"])
            rows.append([model["name"], _params(model["parameters"])]
                        + [_cell(block.get(key), 4 if key == "kl" else 3) for key in present]
                        + ([] if method == "base" else [steps]))
        label = blocks[0]["label"]
        header = ["model", "parameters"] + [LABELS[k] for k in present] + ([] if method == "base" else ["chosen step"])
        parts.append(f"\n## {label} (`{method}`)\n\n" + _table(header, rows))
    parts.append("\n## SFT against MixSD at each size\n\nA difference counts when the two 95% intervals do not "
                 "overlap (conservative: overlapping intervals may still differ).")
    diffs = data["differences"]
    if not diffs:
        parts.append("\nNo comparison: the study has no SFT run or no MixSD run.")
    for model in models:
        mine = [d for d in diffs if d["model"] == model["name"]]
        if not mine:
            continue
        outside = [d for d in mine if d["outside"]]
        lines = [f"- {d['label']}: {LABELS[d['metric']]} {_cell(d['mixsd'])} against SFT {_cell(d['sft'])} "
                 f"({'better' if d['mixsd_better'] else 'worse'} for MixSD)" for d in outside]
        parts.append(f"\n### {model['name']} ({_params(model['parameters'])} parameters)\n\n"
                     + ("\n".join(lines) if lines else f"None of the {len(mine)} comparisons is outside its "
                                                         "intervals."))
    parts.append("\n## Plots\n")
    parts += [f"![{p}]({p})" for p in plots]
    return "\n".join(parts) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """PNG through a temporary file in the same folder and a rename: a reader never sees half a
    plot; in a bucket, one upload (an object appears whole or not at all)."""
    if storage.is_url(path):
        import io

        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=120)
        storage.path(path).write_bytes(buffer.getvalue())
        return
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def plot_metric(data: dict, metric: str, path: Path) -> None:
    """`metric` against parameters (log x): a line per method through its means, its interval as a band."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = _colors(data)
    for method in colors:
        points = sorted((block["parameters"], block[metric]) for methods in data["summary"].values()
                        for m, block in methods.items() if m == method and metric in block
                        and block[metric]["mean"] is not None)
        if not points:
            continue
        xs = [x for x, _ in points]
        label = next(b["label"] for s in data["summary"].values() for m, b in s.items() if m == method)
        ax.plot(xs, [b["mean"] for _, b in points], marker="o", label=label, color=colors[method],
                linestyle="--" if method == "base" else "-")
        if all(b["ci95"][0] is not None for _, b in points):
            ax.fill_between(xs, [b["ci95"][0] for _, b in points], [b["ci95"][1] for _, b in points],
                            color=colors[method], alpha=0.15, linewidth=0)
    _size_axis(ax, data["models"])
    ax.set_xlabel("parameters (log scale)")
    ax.set_ylabel(LABELS[metric])
    ax.set_title(f"{LABELS[metric]} by model size (95% intervals)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_tradeoff(data: dict, path: Path) -> None:
    """Small multiples: a column per model (by size), a row per forgetting measure; each method's
    seeded runs as faint points and their mean with interval bars on both axes."""
    plt = _pyplot()
    models = data["models"]
    measures = [k for k in FORGETTING if any(k in r["metrics"] for r in data["rows"] if r["method"] != "base")]
    measures = measures or ["memorization"]
    fig, axes = plt.subplots(len(measures), len(models), figsize=(3.2 * len(models) + 1, 2.8 * len(measures) + 0.6),
                             squeeze=False, sharey="row")
    colors = _colors(data)
    for col, model in enumerate(models):
        methods = data["summary"].get(model["name"], {})
        for row, measure in enumerate(measures):
            ax = axes[row][col]
            for method, block in methods.items():
                mem, y = block.get("memorization"), block.get(measure)
                if mem is None or y is None or mem["mean"] is None or y["mean"] is None:
                    continue
                color = colors[method]
                runs = [r for r in data["rows"] if r["model"] == model["name"] and r["method"] == method
                        and "memorization" in r["metrics"] and measure in r["metrics"]]
                ax.scatter([r["metrics"]["memorization"]["value"] for r in runs],
                           [r["metrics"][measure]["value"] for r in runs], color=color, alpha=0.3, s=12)
                xerr = _bar(mem)
                yerr = _bar(y)
                ax.errorbar([mem["mean"]], [y["mean"]], xerr=xerr, yerr=yerr, fmt="o", color=color, capsize=3,
                            label=block["label"])
            if row == 0:
                ax.set_title(f"{model['name']} ({_params(model['parameters'])})", fontsize=9)
            if row == len(measures) - 1:
                ax.set_xlabel("memorization")
            if col == 0:
                ax.set_ylabel(LABELS[measure], fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes.flat:  # every method once, from whichever panel drew it
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle("Memorization against forgetting, per model size (means with 95% intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0.08 if handles else 0, 1, 0.95))
    _save(fig, path)
    plt.close(fig)


def _colors(data: dict) -> dict[str, str]:
    """One colour per method in every plot, in table order; the base model grey."""
    methods = [m for m in dict.fromkeys(r["method"] for r in data["rows"]) if m != "base"]
    out = {"base": "gray"} if any(r["method"] == "base" for r in data["rows"]) else {}
    return {**out, **{m: f"C{i}" for i, m in enumerate(methods)}}


def _size_axis(ax, models: Sequence[dict]) -> None:
    """Log x with a tick at each model (its name and size) instead of powers of ten."""
    from matplotlib.ticker import NullFormatter, NullLocator

    xs = [m["parameters"] for m in models]
    ax.set_xscale("log")
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(xs, [f"{m['name']}\n{_params(m['parameters'])}" for m in models], fontsize=8)
    low, high = min(xs), max(xs)
    ax.set_xlim(low / 1.3, high * 1.3)


def _bar(block: dict):
    low, high = block["ci95"]
    if low is None:
        return None
    return [[max(0.0, block["mean"] - low)], [max(0.0, high - block["mean"])]]


def write_scaling_report(name: str, models: Sequence[dict], out_dir: str | Path,
                         missing: Sequence[str] = ()) -> dict[str, Path]:
    """scaling.json, report.md and the plots under `out_dir`; returns their paths."""
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = scaling_rows(models)
    summary = summarize(rows)
    ordered = sorted(models, key=lambda m: m["parameters"])
    data = {
        "name": name,
        "models": [{"name": m["name"], "model": m["model"], "model_type": m.get("model_type"),
                    "parameters": m["parameters"], "runs": sum(r["model"] == m["name"] for r in rows)}
                   for m in ordered],
        "missing": list(missing),
        "rows": rows,
        "summary": summary,
        "differences": differences(summary),
    }
    paths = {"scaling": out_dir / "scaling.json", "report": out_dir / "report.md"}
    atomic_write_json(paths["scaling"], data)
    plots = []
    if rows:
        for key, _, _ in METRICS:
            if any(key in r["metrics"] for r in rows):
                paths[f"plot_{key}"] = out_dir / plot_name(key)
                plot_metric(data, key, paths[f"plot_{key}"])
                plots.append(plot_name(key))
        paths["plot_tradeoff"] = out_dir / PLOT_TRADEOFF
        plot_tradeoff(data, paths["plot_tradeoff"])
        plots.append(PLOT_TRADEOFF)
    atomic_write_text(paths["report"], render_report(name, data, plots))
    return paths
