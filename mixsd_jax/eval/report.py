"""results.json → Markdown tables and PNG plots (matplotlib, Agg backend: no display needed).

Tables: one row per checkpoint — memorization (mean over splits, then each split), retention (mean
of tuned/base ratios, then each benchmark's score and ratio), KL(base || tuned), Fisher-weighted
displacement — each number with its 95% interval in brackets; then the target-NLL table (one row
per training file) and the error buckets. Plots: memorization vs retention per checkpoint with
the Pareto frontier (or a bar chart when only one axis was measured), and the per-token NLL
distributions of the training targets.
"""

from __future__ import annotations

from pathlib import Path

from mixsd_jax import storage
from mixsd_jax.files import atomic_write_json, atomic_write_text

PLOT_TRADEOFF = "memorization_vs_retention.png"
PLOT_NLL = "nll_targets.png"
PLOT_FORGETTING = "memorization_vs_heldout.png"


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ci(value, ci, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if not ci or ci[0] is None:
        return _num(value, digits)
    return f"{_num(value, digits)} [{_num(ci[0], digits)}, {_num(ci[1], digits)}]"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _label(results: dict, name: str) -> str:
    label = results["checkpoints"][name]["label"]
    return name if label == name else f"{name} ({label})"


def render_table(results: dict) -> str:
    """The report's tables as Markdown (what the demo prints)."""
    names = list(results["checkpoints"])
    sections = []
    header, columns = ["checkpoint"], []
    mem, ret = results.get("memorization"), results.get("retention")
    if mem:
        splits = list(mem[names[0]]["splits"])
        with_reference = "reference_mean" in mem[names[0]]
        with_trained = any("trained_recall" in mem[n] for n in names)
        header += (["memorization"] + (["reference scorer"] if with_reference else []) + splits
                   + (["recall on its trained facts"] if with_trained else []))

        def memorization_cells(n):
            cells = [_ci(mem[n]["mean"], mem[n]["ci95"])] + ([_num(mem[n]["reference_mean"])] if with_reference else [])
            for s in splits:
                block = mem[n]["splits"][s]
                cell = _ci(block["accuracy"], block["ci95"])
                cells.append(cell + (f"; ref {_num(block['reference']['accuracy'])}" if "reference" in block else ""))
            if with_trained:
                trained = mem[n].get("trained_recall")
                cells.append("–" if trained is None else f"{trained['correct']}/{trained['n']}")
            return cells

        columns.append(memorization_cells)
        if with_reference:
            sections.append(f"Answer criterion: `{results.get('criterion')}` (mixsd_jax/answers/criteria.py), used by the MixSD "
                            "verifier and this scorer; `reference scorer` / `ref` = the reference's scorer (last "
                            "`\\boxed{}`, else last number; the split's strict/loose mode) on the same replies.")
        if with_trained:
            sections.append("`recall on its trained facts`: the recall questions whose fact is in the checkpoint's "
                            "own training file (MixSD trains only on the facts whose target passed the verifier).")
    if ret:
        benches = list(ret[names[0]]["benchmarks"])
        header += ["retention"] + [f"{b} ({ret[names[0]]['benchmarks'][b]['metric']})" for b in benches]

        def retention_cells(n):
            cells = [_num(ret[n]["mean"])]
            for b in benches:
                s, r = ret[n]["benchmarks"][b], ret[n]["ratios"][b]
                cell = _ci(s["score"], s["ci95"])
                if n != "base":
                    cell += f"; ×{_ci(r['ratio'], r['ci95'], 2)}" if r["ratio"] is not None else "; × n/a"
                cells.append(cell)
            return cells

        columns.append(retention_cells)
    if results.get("kl"):
        header.append("KL(base‖tuned) /token")
        columns.append(lambda n: [_ci(results["kl"][n]["kl_token_mean"], results["kl"][n]["ci95"], 4)
                                  if n in results["kl"] else "–"])
    if results.get("fisher"):
        header += ["Fisher displacement", "L2² displacement"]
        columns.append(lambda n: [f"{results['fisher'][n]['fisher_displacement']:.3e}",
                                  f"{results['fisher'][n]['l2_displacement_sq']:.3e}"]
                       if n in results["fisher"] else ["–", "–"])
    if columns:
        rows = []
        for n in names:
            row = [_label(results, n)]
            for column in columns:
                row += column(n)
            rows.append(row)
        sections.append(_table(header, rows))
    for split in list(mem[names[0]]["splits"]) if mem else []:
        ops = sorted({op for n in names for op in mem[n]["splits"][split].get("per_op", {})})
        if ops:
            rows = [[_label(results, n)] + [_num(mem[n]["splits"][split].get("per_op", {}).get(op, {}).get("accuracy"))
                                            for op in ops] for n in names]
            sections.append(f"Per-operation accuracy, {split}:\n\n" + _table(["checkpoint"] + ops, rows))
    seeds = results.get("over_seeds")
    if seeds:
        metrics = [k for k in next(iter(seeds.values())) if k != "runs"]
        rows = [[group, str(len(block["runs"]))]
                + [_ci(block[k]["mean"], block[k]["ci95"]) if k in block else "–" for k in metrics]
                for group, block in seeds.items()]
        sections.append("Over training seeds (mean and 95% t-interval across seeded runs):\n\n"
                        + _table(["method", "seeds", *metrics], rows))
    held = results.get("heldout")
    if held:
        first = held[names[0]]
        rows = [[_label(results, n), str(held[n]["n"])]
                + [f"{held[n][k]['count']}/{held[n]['n']} = {_ci(held[n][k]['rate'], held[n][k]['ci95'], 2)}"
                   for k in ("leakage", "template", "collapse")] for n in names]
        runs = list(first.get("opens_like", {}))
        if runs:  # a tuned checkpoint opens like its own targets; the base's rate on the same openings beside it
            for row, n in zip(rows, names):
                own = held[n]["opens_like"].get(n)
                row.append("–" if own is None else f"{own['count']}/{held[n]['n']} (base {first['opens_like'][n]['count']})")
        template = first.get("template_text")
        sections.append(
            "Held-out general questions as chat turns (greedy; rates with 95% intervals): replies naming a training "
            "entity the question does not (leakage), opening with the trained answer template "
            f"({'“' + template + ' …”' if template else 'none found'}), and §4.4 collapse:\n\n"
            + _table(["checkpoint", "replies", "leakage", "template", "collapse (§4.4)"]
                     + (["opens like its training targets"] if runs else []), rows))
    nll = results.get("nll")
    if nll:
        rows = []
        for scope in ("files", "common"):
            for name, s in nll.get(scope, {}).items():
                rows.append([name + (" (records in every file)" if scope == "common" else ""), str(s["records"]),
                             str(s["tokens"]), _ci(s["mean_token_nll"], s["ci95"]),
                             _num(s["median_token_nll"]), _num(s["mean_record_nll"]),
                             _num(s.get("mean_target_tokens"), 1), _num(s.get("mean_record_total_nll"), 1)])
        sections.append("Per-token NLL of training targets under the base model (nats):\n\n" + _table(
            ["targets", "records", "tokens", "mean NLL/token", "median", "mean of record means", "tokens/record",
             "NLL/record"], rows))
    errors = results.get("errors")
    if errors:
        rows = []
        for n in names:
            e = errors[n]
            h, t = e["heldout"], e["train"]
            rows.append([_label(results, n), str(h["total"])] + [str(h[k]) for k in ("format", "leakage", "collapse",
                        "genuine")] + [str(t["total"])] + [str(t[k]) for k in ("format", "cross_entity", "genuine")])
        sections.append("Wrong answers by cause (held-out generative benchmarks; training-set recall):\n\n" + _table(
            ["checkpoint", "held-out wrong", "format", "leakage", "collapse", "genuine", "train wrong", "format",
             "cross_entity", "genuine"], rows))
    return "\n\n".join(sections) + "\n"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher is better), by x."""
    front = []
    for i, (x, y) in enumerate(points):
        dominated = any(
            (x2 >= x and y2 >= y) and (x2 > x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i
        )
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tradeoff(results: dict, path: Path) -> None:
    plt = _pyplot()
    summary = results["summary"]
    names = list(summary)
    labels = [summary[n]["label"] for n in names]
    mem = [summary[n]["memorization"] for n in names]
    ret = [summary[n]["retention"] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    if all(v is not None for v in mem + ret):
        ci = [(results.get("memorization") or {}).get(n, {}).get("ci95") or [None, None] for n in names]
        if all(low is not None for low, _ in ci):  # horizontal bars: the 95% interval of memorization
            xerr = [[m - low for m, (low, _) in zip(mem, ci)], [high - m for m, (_, high) in zip(mem, ci)]]
            ax.errorbar(mem, ret, xerr=xerr, fmt="none", ecolor="lightgray", capsize=3, zorder=1)
        ax.scatter(mem, ret, s=40, zorder=3)
        at_point: dict[tuple[float, float], list[str]] = {}
        for x, y, label in zip(mem, ret, labels):
            at_point.setdefault((x, y), []).append(label)
        for (x, y), same in at_point.items():  # checkpoints that tie share one label
            ax.annotate(", ".join(same), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        front = pareto_front(list(zip(mem, ret)))
        ax.plot([mem[i] for i in front], [ret[i] for i in front], "--o", color="gray", mfc="none", ms=12,
                zorder=2, label="Pareto frontier")
        ax.set_xlabel("memorization (mean accuracy over test splits)")
        ax.set_ylabel("retention (mean tuned/base score)")
        ax.legend(loc="best", fontsize=8)
        ax.set_title("Memorization vs retention")
    else:
        measured = [(name, vals) for name, vals in (("memorization", mem), ("retention", ret))
                    if all(v is not None for v in vals)]
        if measured:
            axis_name, vals = measured[0]
            ax.bar(range(len(vals)), vals)
            ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(axis_name)
            ax.set_title(f"{axis_name} per checkpoint (the other axis was not measured)")
        else:
            ax.text(0.5, 0.5, "neither memorization nor retention was measured", ha="center", va="center")
            ax.set_axis_off()
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_forgetting(results: dict, path: Path) -> None:
    """Memorization against the held-out chat replies' leakage and template rates (95% intervals).

    At 135M the forgetting is generative (injected entities and the trained template in unrelated
    replies) while log-likelihood retention barely moves: this is the plot where the trade-off shows.
    """
    plt = _pyplot()
    summary, heldout = results["summary"], results["heldout"]
    names = [n for n in summary if n in heldout and summary[n]["memorization"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    series = (("leakage", "o", "names an injected entity"), ("template", "^", "opens with the trained template"))
    for key, marker, text in series:
        xs = [summary[n]["memorization"] for n in names]
        ys = [heldout[n][key]["rate"] for n in names]
        yerr = [[y - heldout[n][key]["ci95"][0] for n, y in zip(names, ys)],
                [heldout[n][key]["ci95"][1] - y for n, y in zip(names, ys)]]
        ax.errorbar(xs, ys, yerr=yerr, fmt=marker, capsize=3, label=f"{text} ({key})")
    for n in names:  # one label per checkpoint, above its markers
        top = max(heldout[n][key]["rate"] for key, _, _ in series)
        ax.annotate(summary[n]["label"], (summary[n]["memorization"], top), textcoords="offset points",
                    xytext=(4, 8), fontsize=8, rotation=30)
    ax.set_xlabel("memorization (mean accuracy over test splits)")
    ax.set_ylabel(f"share of {heldout[names[0]]['n'] if names else 0} held-out replies (lower is better)")
    ax.set_ylim(-0.05, 1.05)
    ax.legend(loc="best", fontsize=8)
    ax.set_title("Memorization vs forgetting on held-out questions")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def plot_nll(results: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for name, s in results["nll"]["files"].items():
        bins, counts = s["histogram"]["bins"], s["histogram"]["counts"]
        total = max(1, sum(counts))
        ax.stairs([c / total for c in counts], bins, label=f"{name} (mean {s['mean_token_nll']:.2f})")
    ax.set_xlabel("per-token NLL under the base model (nats; last bin includes larger values)")
    ax.set_ylabel("fraction of target tokens")
    ax.set_title("Training targets under the base model's naive conditional")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _save(fig, path) -> None:
    """A PNG written in one piece (a bucket object is one upload; matplotlib would write a local file)."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    storage.path(path).write_bytes(buffer.getvalue())


def write_report(results: dict, out_dir: str | Path) -> dict[str, Path]:
    """results.json, report.md and the plots under `out_dir`; returns their paths."""
    out_dir = storage.path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"results": out_dir / "results.json", "report": out_dir / "report.md",
             "tradeoff_plot": out_dir / PLOT_TRADEOFF}
    atomic_write_json(paths["results"], results)
    plot_tradeoff(results, paths["tradeoff_plot"])
    if results.get("nll"):
        paths["nll_plot"] = out_dir / PLOT_NLL
        plot_nll(results, paths["nll_plot"])
    if results.get("heldout"):
        paths["forgetting_plot"] = out_dir / PLOT_FORGETTING
        plot_forgetting(results, paths["forgetting_plot"])
    body = ["# MixSD evaluation", "", render_table(results)]
    body.append(f"![memorization vs retention]({PLOT_TRADEOFF})")
    if "forgetting_plot" in paths:
        body.append(f"\n![memorization vs held-out forgetting]({PLOT_FORGETTING})")
    if "nll_plot" in paths:
        body.append(f"\n![target NLL]({PLOT_NLL})")
    body.append("")
    atomic_write_text(paths["report"], "\n".join(body))
    return paths
