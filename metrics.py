"""The scores of one task's answers: the confusion matrix and what it gives (accuracy, macro-F1)
for tasks with choices; exact match and ROUGE-L for generated answers; a task's headline score.
eval.py computes them, report.py shows them.

    python eval.py --ckpt runs/teamlora   # scores every task of the run's test split with these
"""
import torch


def _normalize(s):
    """Case-folded, whitespace runs collapsed: "Neutral " and "neutral" are the same answer."""
    return " ".join(s.split()).casefold()


def confusion(pred, gold, labels):
    """(L, L) counts, row = gold label, column = predicted label; float64 so ranks can all_reduce it."""
    index = {label: i for i, label in enumerate(labels)}
    cm = torch.zeros(len(labels), len(labels), dtype=torch.float64)
    for p, g in zip(pred, gold):
        if p not in index or g not in index:
            raise ValueError(f"label {p if p not in index else g!r} is not one of {labels}")
        cm[index[g], index[p]] += 1
    return cm


def accuracy(cm):
    return (cm.trace() / cm.sum()).item()


def macro_f1(cm):
    """Mean over labels of F1 = 2 TP / (2 TP + FP + FN); a label never gold nor predicted is skipped."""
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    seen = tp + fp + fn > 0
    return (2 * tp / (2 * tp + fp + fn).clamp(min=1))[seen].mean().item() if seen.any() else 0.0


def exact_match(pred, gold):
    """1.0 when the answers agree after case folding and whitespace normalisation."""
    return float(_normalize(pred) == _normalize(gold))


def rouge_l(pred, gold):
    """F1 of the longest common subsequence of whitespace tokens (normalised as in exact_match)."""
    p, g = _normalize(pred).split(), _normalize(gold).split()
    if not p or not g:
        return float(p == g)
    row = [0] * (len(g) + 1)  # row[j] = LCS(p[:i], g[:j]), one row of the DP table at a time
    for x in p:
        diag = 0  # LCS(p[:i-1], g[:j-1])
        for j, y in enumerate(g, 1):
            diag, row[j] = row[j], diag + 1 if x == y else max(row[j], row[j - 1])
    lcs = row[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(p) + len(g))  # = 2 P R / (P + R), P = lcs/|p|, R = lcs/|g|


def headline(scores):
    """A task's headline score: accuracy for choice tasks, exact match for generated answers."""
    return scores["accuracy"] if "accuracy" in scores else scores["exact_match"]
