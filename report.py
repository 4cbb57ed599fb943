"""What an evaluation shows and keeps: the tables printed (per-task scores, routing, the
analyses), OUT/eval.json, OUT/predictions.jsonl and the pictures written, and --compare, which
reads runs' eval.json and summary.json back into one table, one row per setup (seeds grouped).

    python eval.py --ckpt runs/teamlora                   # prints these tables, writes these files
    python eval.py --compare runs/lora runs/teamlora      # one row per setup, seeds grouped (mean ± sd)
"""
import json
import math
from pathlib import Path

import analyses
import common
from common import UserError
from metrics import headline


# ----------------------------------------------------------------------------- tables


def _cell(c):
    if isinstance(c, str):
        return c
    if c is None:
        return "-"
    return f"{c:.3f}" if isinstance(c, float) else str(c)


def _table(header, rows):
    """Columns padded to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[_cell(c) for c in row] for row in [header] + rows]
    width = [max(len(r[i]) for r in cells) for i in range(len(header))]
    left = [all(isinstance(row[i], str) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) if lf else c.rjust(w) for c, w, lf in zip(r, width, left)).rstrip()
                     for r in cells)


def format_table(results):
    """Per-task scores with the majority baseline, then the routing table (if any)."""
    rows = [[t, s["n"], headline(s), results["majority"]["tasks"][t], s.get("macro_f1"), s.get("rouge_l")]
            for t, s in results["tasks"].items()]
    rows.append(["average", sum(s["n"] for s in results["tasks"].values()), results["average"],
                 results["majority"]["average"], None, None])
    text = (_table(["task", "n", "score", "majority", "macro_f1", "rouge_l"], rows) +
            "\nscore: accuracy (choices) or exact match (generated); majority: always giving the task's most "
            "frequent training answer (tasks with choices only)")
    routing = results.get("routing") or {}
    return text + "\n\n" + format_routing(routing) if routing else text


def format_routing(routing):
    """The routing table: per task, each expert's mean share, the entropies, the top-1 share (then
    one line on the per-layer figures, analyses.layer_note)."""
    k = len(next(iter(routing.values()))["mean"])
    rows = [[t, *r["mean"], r["entropy"], r["load_entropy"], r.get("top_half"), r.get("entropy_norm")]
            for t, r in routing.items()]
    text = ("routing: mean share of each expert over layers and real tokens\n"
            + _table(["task", *(f"e{i}" for i in range(k)), "entropy", "load_entropy", "top>1/2", "entropy/logk"], rows)
            + "\nentropy: each token's routing entropy, averaged (low: a token leans on few experts); "
            "load_entropy: the entropy of the task's mean shares (low: the task as a whole uses few experts)"
            f"\nboth in nats, at most log k = {math.log(k):.3f} (k = {k} experts), reached when the weight is "
            "spread evenly; top>1/2: the share of tokens whose top expert holds more than half the weight; "
            "entropy/logk: entropy over its maximum (1 = even, 0 = one expert)")
    if "layers_top_half" in next(iter(routing.values())):
        text += "\n" + analyses.layer_note(routing)
    return text


def format_analyses(results):
    """The interaction matrix (shapley runs) and the knock-out variants (--knockout), when present."""
    parts = []
    if results.get("interaction"):
        parts.append("interaction matrix M of the shapley routers: w~_i = sum_j M_ij phi_j\n"
                     + _section(*analyses.interaction_table(results["interaction"])))
    if results.get("knockout"):
        parts.append("knock-out: the test scores with some experts' weights zeroed\n"
                     + _section(*analyses.knockout_table(results["knockout"])))
    return "\n\n".join(parts)


def _section(header, rows, notes):
    return _table(header, rows) + "".join("\n" + note for note in notes)


def write_results(out, results, predictions):
    """Print the tables and write OUT/eval.json, OUT/predictions.jsonl and (routed methods, with
    matplotlib) OUT/routing.png, each replacing an earlier one; says where each went."""
    out = Path(out)
    replaced = (out / "eval.json").exists()
    common.atomic_save(json.dumps(results, indent=1), out / "eval.json")
    common.atomic_save("".join(json.dumps(p) + "\n" for p in predictions), out / "predictions.jsonl")
    print(format_table(results))
    if format_analyses(results):
        print("\n" + format_analyses(results))
    _save_pictures(out, results)
    print(f"scores -> {out / 'eval.json'}{' (replacing the earlier evaluation)' if replaced else ''}; "
          f"one line per test example -> {out / 'predictions.jsonl'}")


def _save_pictures(out, results):
    """routing.png and routing_layers.png (routed runs), interaction.png (shapley runs); one line
    saying so when matplotlib is missing."""
    pictures = [(name, save, what) for name, save, what in [
        ("routing.png", save_heatmap, results["routing"]),
        ("routing_layers.png", analyses.save_layer_heatmap, results["routing"]),
        ("interaction.png", analyses.save_interaction, results.get("interaction"))] if what]
    try:
        for name, save, what in pictures:
            save(what, out / name)
            print(f"{name.removesuffix('.png').replace('_', ' ')} picture -> {out / name}")
    except ImportError:
        if pictures:
            print(f"matplotlib is not installed: {', '.join(n for n, _, _ in pictures)} skipped (pip install matplotlib)")


def save_heatmap(routing, path):
    """routing.png: tasks x experts, each expert's mean share over layers."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    tasks = list(routing)
    shares = [routing[t]["mean"] for t in tasks]  # (tasks, k)
    k = len(shares[0])
    fig, ax = plt.subplots(figsize=(2 + 0.7 * k, 1 + 0.45 * len(tasks)))
    image = ax.imshow(shares, cmap="viridis", vmin=0, aspect="auto")
    ax.set_xticks(range(k), [f"expert {i}" for i in range(k)])
    ax.set_yticks(range(len(tasks)), tasks)
    for y, row in enumerate(shares):
        for x, v in enumerate(row):
            ax.text(x, y, f"{v:.2f}", ha="center", va="center", color="w" if v < max(map(max, shares)) / 2 else "k")
    ax.set_title("mean routing share per task (average over layers)")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _read_json(path):
    if not path.exists():
        hint = f"run `python eval.py --ckpt {path.parent}` first" if path.name == "eval.json" else "is it a train.py output?"
        raise FileNotFoundError(f"{path} not found: {hint}")
    return json.loads(path.read_text())


def _mean_sd(values, digits=3):
    """'mean ± sd' over seeds (sample sd), or the value itself for one run."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    if len(values) == 1:
        return values[0] if digits else round(values[0])
    m = sum(values) / len(values)
    return f"{m:.{digits}f} ± {math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)):.{digits}f}"


def _setup(summary, evaluation, path):
    """What makes two runs one setup: every flag but the seed and those that only say how it ran,
    and the same test examples (data and number per task)."""
    if "config" not in summary:
        raise UserError(f"{path}: no config (written by an older train.py); retrain to compare it")
    flags = {k: v for k, v in summary["config"].items() if k not in common.RUN_ONLY + ("seed",)}
    tested = {"data": evaluation.get("data"), "n": {t: s["n"] for t, s in evaluation["tasks"].items()}}
    return json.dumps([flags, tested], sort_keys=True)


def _router(summary):
    """The router a run used: summary.json's adapter config says (older summaries: the flag, or
    "default" for the method's own); "-" for methods without one."""
    if summary["config"]["method"] in ("lora", "full"):
        return "-"
    return (summary.get("adapter") or {}).get("router") or summary["config"].get("router") or "default"


def _distinct(group):
    """Refuse to count one run twice as two seeds of a setup (the sd would shrink): the same
    directory named twice, or a copy of a run, whose summary.json (its training time to the
    microsecond, tokens, final loss) is the other's. A run evaluated on other test examples is
    another setup's row, not a seed, and may appear beside itself."""
    seen = {}
    for d, s, _ in group:
        for key in (("dir", str(d.resolve())), ("summary", json.dumps(s, sort_keys=True))):
            if key in seen:
                what = "are one directory" if key[0] == "dir" else "are copies of one run (identical summary.json)"
                raise UserError(f"--compare: {seen[key]} and {d} {what}: it would count as two seeds; name it once")
            seen[key] = d


def compare(out_dirs):
    """One row per setup (summary.json + eval.json): runs that differ only in the seed become one
    row, each number their mean ± sd. Columns: setup, cost, test examples, average, per-task
    scores. Then the majority baseline from the runs' own evaluations: one row, or one row per
    group of runs when they were tested on different examples."""
    runs = [(Path(d), _read_json(Path(d) / "summary.json"), _read_json(Path(d) / "eval.json")) for d in out_dirs]
    tasks = sorted({t for _, _, e in runs for t in e["tasks"]})
    knocked = any("knockout" in e for _, _, e in runs)  # eval.py --knockout ran on one: a top-1 column
    groups = {}
    for d, s, e in runs:
        groups.setdefault(_setup(s, e, d / "summary.json"), []).append((d, s, e))
    rows = []
    for group in groups.values():
        _distinct(group)
        d, s, e = group[0]
        c = s["config"]

        def col(f, digits=3, group=group):
            return _mean_sd([f(s, e) for _, s, e in group], digits)

        rows.append([str(d) if len(group) == 1 else f"{d} (+{len(group) - 1} seeds)", c.get("base") or "-",
                     c["method"], c["rank"], c["experts"] if _router(s) != "-" else None, _router(s),
                     s["trainable_pct"], col(lambda s, e: s["train_time_s"], 0), col(lambda s, e: s["tokens_per_s"], 0),
                     _n(e), col(lambda s, e: e["average"]),
                     *([col(lambda s, e: (e.get("knockout") or {}).get("top1_keeps_pct"), 1)] if knocked else []),
                     *(col(lambda s, e, t=t: headline(e["tasks"][t]) if t in e["tasks"] else None) for t in tasks)])
    baselines = {}  # the runs' majority rows, one per distinct baseline
    for d, _, e in runs:
        baselines.setdefault(json.dumps([e["majority"], _n(e)], sort_keys=True), []).append(d)
    for key, dirs in baselines.items():
        majority, n = json.loads(key)
        name = "majority class" if len(baselines) == 1 else f"majority class of {', '.join(map(str, dirs))}"
        rows.append([name, "", "", None, None, "", None, None, None, n, majority["average"], *([None] * knocked),
                     *(majority["tasks"].get(t) for t in tasks)])
    header = ["run", "base", "method", "rank", "experts", "router", "trainable%", "time_s", "tokens/s", "n",
              "average", *(["top1_keeps%"] * knocked), *tasks]
    notes = ["scores: accuracy (choice tasks) or exact match; trainable% of the base; n: test examples scored; "
             "mean ± sd over runs that differ only in the seed",
             "majority class: always the most frequent training answer of each task with choices"]
    if knocked:
        notes.append("top1_keeps%: the average with only each token's top-1 expert, as % of all experts' "
                     "(eval.py --knockout; - where it was not run)")
    if len(baselines) > 1:
        notes.append("the runs were tested on different examples (data or --limit): one majority row for each")
    return _table(header, rows) + "".join("\n" + note for note in notes)


def _n(evaluation):
    """The number of test examples an evaluation scored."""
    return sum(s["n"] for s in evaluation["tasks"].values())
