"""What the experts do: the paper's analyses of a routed run, as eval.py prints and draws them.

    python eval.py --ckpt runs/teamlora --knockout   # every evaluation + the knock-out variants

- Knock-out (`--knockout`): the test split scored again with the router's weights post-processed
  by teamlora.knock_out: only each token's top-1 expert, each expert dropped in turn, each expert
  alone, beside all experts. The paper's redundancy figure is "top-1 keeps X % of the full score".
- The interaction matrix M of shapley routers (teamlora.interaction_summary), per layer and
  averaged, with its distance from the identity and which experts raise or lower each other's weight.
- Routing per layer, beyond eval.py's per-task means: each adapted layer's expert shares, the share
  of tokens whose top expert holds more than half the weight, and the entropy / log k.

Computations return plain dicts (eval.json's); the *_table functions return (header, rows, notes)
for report.py's table printer; save_* draw OUT/interaction.png and OUT/routing_layers.png.
Imports only teamlora (and matplotlib when drawing), so eval.py and report.py may import it.
"""
import math

import teamlora

# ----------------------------------------------------------------------------- knock-out


def knockout_variants(k):
    """{name: teamlora.knock_out variant}: all experts (None), each token's top-1, each dropped, each alone."""
    return {"all": None, "top1": ("top1", None), **{f"drop{i}": ("drop", i) for i in range(k)},
            **{f"alone{i}": ("alone", i) for i in range(k)}}


def knockout(model, score, full=None):
    """Every knockout_variants entry scored by score() (no arguments: the model's test scores as it is
    routed now, {"average": x, "tasks": {task: headline score}}); full: the all-experts scores if
    already at hand. Returns {"variants": {name: scores}, "top1_keeps_pct": 100 top1 / all,
    "best_alone": the fixed expert that keeps most, "best_alone_keeps_pct"}. The routers are
    restored however it ends. A model without routed layers raises ValueError."""
    k = teamlora.set_knockout(model, None)
    variants = {}
    try:
        for name, variant in knockout_variants(k).items():
            if name == "all" and full is not None:
                variants[name] = full
                continue
            teamlora.set_knockout(model, variant)
            variants[name] = score()
    finally:
        teamlora.set_knockout(model, None)
    keeps = {name: _keeps(v["average"], variants["all"]["average"]) for name, v in variants.items()}
    alone = max((n for n in variants if n.startswith("alone")), key=lambda n: keeps[n] if keeps[n] is not None else -1)
    return {"variants": variants, "top1_keeps_pct": keeps["top1"], "best_alone": alone,
            "best_alone_keeps_pct": keeps[alone]}


def _keeps(score, full):
    """score as a percentage of the full score; None when either is missing or the full score is 0."""
    return None if score is None or not full else 100.0 * score / full


def knockout_table(ko):
    """One row per variant: the average, its percentage of the all-experts average, each task."""
    variants = ko["variants"]
    tasks = list(variants["all"]["tasks"])
    full = variants["all"]["average"]
    keeps = [_keeps(v["average"], full) for v in variants.values()]  # as text, one decimal, right-aligned
    rows = [[name, v["average"], "-".rjust(5) if p is None else f"{p:5.1f}", *(v["tasks"].get(t) for t in tasks)]
            for (name, v), p in zip(variants.items(), keeps)]
    notes = [f"top-1 keeps {_pct(ko['top1_keeps_pct'])} of the full score (each token's best expert, weight "
             f"renormalised to the router's total); the best fixed expert ({ko['best_alone']}) keeps "
             f"{_pct(ko['best_alone_keeps_pct'])}",
             "dropK: expert K's weight zeroed, the others rescaled to the total; aloneK: expert K only; "
             "keeps%: average / the all-experts average"]
    return ["variant", "average", "keeps%", *tasks], rows, notes


def _pct(x):
    return "-" if x is None else f"{x:.1f} %"


# ----------------------------------------------------------------------------- interaction matrix


def interaction(model):
    """teamlora.interaction_summary plus, from the mean M over layers, "raises" and "lowers": the
    off-diagonal entries [j, i, M_ij] (expert j's Shapley value raises / lowers expert i's weight),
    strongest first. {} without shapley routers."""
    summary = teamlora.interaction_summary(model)
    if not summary:
        return summary
    M = summary["mean"]["M"]
    pairs = sorted(([j, i, M[i][j]] for i in range(len(M)) for j in range(len(M)) if i != j), key=lambda p: -abs(p[2]))
    return {**summary, "raises": [p for p in pairs if p[2] > 0], "lowers": [p for p in pairs if p[2] < 0]}


def interaction_table(summary):
    """The mean M over layers (row i: expert i's weight, column j: expert j's Shapley value), then
    notes with the distances from the identity, over layers, and the strongest raise and lower."""
    M, layers = summary["mean"]["M"], summary["layers"]
    k, n = len(M), len(layers)
    dist = sorted((d["identity_distance"], name) for name, d in layers.items())
    mean = summary["mean"]
    notes = [f"M averaged over {n} layers: ||M - I||_F {mean['identity_distance']:.3f}, off-diagonal "
             f"{mean['off_diagonal']:.3f}, diagonal drift ||diag M - 1|| {mean['diagonal_drift']:.3f}; the init's "
             f"off-diagonal entries, averaged over {n} layers, have sd {0.1 / math.sqrt(3 * n):.3f}",
             f"per layer ||M - I||_F: median {dist[n // 2][0]:.3f}, range {dist[0][0]:.3f} ({dist[0][1]}) to "
             f"{dist[-1][0]:.3f} ({dist[-1][1]}); at init ~{summary['init_off_diagonal']:.3f} (off-diagonal "
             "U(-0.1, 0.1), diagonal 1)"]
    for word in ("raises", "lowers"):
        if summary[word]:
            pairs = ", ".join(f"e{j} {word} e{i} ({m:+.3f})" for j, i, m in summary[word][:3])
            notes.append(f"{word} (strongest): {pairs}")
    return ["M: weight of", *(f"e{j}" for j in range(k))], [[f"e{i}", *row] for i, row in enumerate(M)], notes


# ----------------------------------------------------------------------------- routing per layer


def layer_routing(routing):
    """{layer: {"shares": (k,), "top_half", "entropy_norm"}}: routing_by_task's per-layer figures of
    every task, weighted by the task's tokens (every layer sees the same tokens)."""
    total = sum(r["tokens"] for r in routing.values()) or 1
    out = {}
    for name in next(iter(routing.values()))["layers"]:
        k = len(next(iter(routing.values()))["layers"][name])
        out[name] = {"shares": [sum(r["tokens"] * r["layers"][name][i] for r in routing.values()) / total
                                for i in range(k)],
                     **{key: sum(r["tokens"] * r[f"layers_{key}"][name] for r in routing.values()) / total
                        for key in ("top_half", "entropy_norm")}}
    return out


def layer_note(routing):
    """One line: how the per-layer figures spread over the layers."""
    layers = layer_routing(routing)

    def spread(key):
        values = [v[key] for v in layers.values()]
        return f"{min(values):.3f}-{max(values):.3f}"

    top = max(max(v["shares"]) for v in layers.values())
    return (f"per layer ({len(layers)} layers, all tasks): top > 1/2 {spread('top_half')}, entropy / log k "
            f"{spread('entropy_norm')}, largest mean share of one expert {top:.3f}")


# ----------------------------------------------------------------------------- pictures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def save_interaction(summary, path):
    """interaction.png: the mean M - I over layers (left), ||M - I||_F of each layer (right)."""
    plt = _pyplot()
    M = summary["mean"]["M"]
    k = len(M)
    delta = [[M[i][j] - (i == j) for j in range(k)] for i in range(k)]
    lim = max(abs(v) for row in delta for v in row) or 1.0
    fig, (left, right) = plt.subplots(1, 2, figsize=(8, 3.2), gridspec_kw={"width_ratios": [1, 1.6]})
    image = left.imshow(delta, cmap="RdBu_r", vmin=-lim, vmax=lim)
    left.set_xticks(range(k), [f"e{j}" for j in range(k)])
    left.set_yticks(range(k), [f"e{i}" for i in range(k)])
    left.set_xlabel("j: Shapley value of expert j")
    left.set_ylabel("i: weight of expert i")
    for i, row in enumerate(delta):
        for j, v in enumerate(row):
            left.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=8)
    left.set_title("mean M - I over layers", fontsize=10)
    fig.colorbar(image, ax=left, fraction=0.046)
    layers = list(summary["layers"].values())
    right.plot([d["identity_distance"] for d in layers], ".-", label="||M - I||_F")
    right.plot([d["diagonal_drift"] for d in layers], ".-", label="||diag M - 1||")
    right.axhline(summary["init_off_diagonal"], color="grey", ls="--", label="init (expected)")
    right.set_xlabel("adapted layer (model order)")
    right.set_title("distance from the identity per layer", fontsize=10)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def save_layer_heatmap(routing, path):
    """routing_layers.png: adapted layers x experts, each expert's share over every task's tokens."""
    plt = _pyplot()
    layers = layer_routing(routing)
    shares = [v["shares"] for v in layers.values()]
    k = len(shares[0])
    fig, ax = plt.subplots(figsize=(1.8 + 0.5 * k, 1 + 0.11 * len(shares)))
    image = ax.imshow(shares, cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(k), [f"e{i}" for i in range(k)])
    step = max(1, len(shares) // 30)  # at most ~30 labels
    names = list(layers)
    ax.set_yticks(range(0, len(names), step), [names[i].replace("layers.", "").replace(".feed_forward", "")
                                               for i in range(0, len(names), step)], fontsize=6)
    ax.set_title("routing share per layer", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
