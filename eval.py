"""Evaluate a fine-tuned run on its mixture's test split: per-task scores, the majority-class
baseline, and how the routed experts share the work of each task; and eval.py's command line.
The scores are metrics.py's; the tables, eval.json and --compare are report.py's.

    python eval.py --ckpt runs/teamlora                   # prints the tables, writes eval.json and predictions
    torchrun --nproc_per_node 8 eval.py --ckpt runs/teamlora --data my_mix/
    python eval.py --compare runs/lora runs/teamlora      # one row per setup, seeds grouped (mean ± sd)
    python eval.py --ckpt runs/teamlora --knockout        # + the experts knocked out (analyses.py)
    python eval.py --ckpt runs/teamlora --prompt "..."    # generate with the run's adapters instead

A task with choices is scored by likelihood: every choice is appended to the prompt as the
answer, and the one whose answer tokens + EOS are most probable wins (accuracy, macro-F1). A task
without choices is answered by greedy generation (exact match, ROUGE-L). The average is the mean
over tasks of each task's headline score (accuracy, or exact match), as the paper averages them.
The majority-class baseline always gives a task's most frequent training answer, scored on the
test split (tasks with choices only). Under torchrun each rank scores examples[rank::world];
counts are summed with all_reduce.

--ckpt OUT writes OUT/eval.json (the tables' numbers, and the data and limit they come from),
OUT/predictions.jsonl (one line per test example: task, input, gold, predicted, score = the
chosen choice's log-likelihood or the answer's ROUGE-L, correct) and, for routed methods with
matplotlib installed, OUT/routing.png and OUT/routing_layers.png (+ OUT/interaction.png for shapley
routers, analyses.py); train.py's final evaluation writes the same files.
"""
import argparse
import math
import warnings
from collections import Counter
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; unused here
import torch
import torch.distributed as dist
from tqdm import tqdm

import analyses
import common
import report
import teamlora
from common import UserError, cli
from data import IGNORE, collate, encode_example, load_mixture
from metrics import accuracy, confusion, exact_match, headline, macro_f1, rouge_l
from model import Transformer

# ----------------------------------------------------------------------------- running the model


def _device(model):
    return next(model.parameters()).device


def _rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _batches(items, batch_size, desc):
    bar = tqdm(range(0, len(items), batch_size), desc=desc, leave=False, disable=_rank_world()[0] != 0)
    return (items[i : i + batch_size] for i in bar)


def _forward(model, items, tok):
    """Per-position losses (B, T) of (input_ids, targets) pairs, right-padded (under causal attention
    a pad never reaches an earlier position, so real tokens see what they would alone), and the
    padded batch. The output layer runs only at the target positions."""
    batch = {k: v.to(_device(model)) for k, v in collate([(x, y, 0) for x, y in items], tok.pad_id).items()}
    return model(batch["tokens"], batch["targets"], reduction="none"), batch


def _shared_prompt(tok, ex, seq_len):
    """(prompt ids, [answer ids + EOS for each choice]): one prompt for every choice, truncated to
    leave room for the longest, so that no choice is scored against a shorter input than another."""
    encoded = [encode_example(tok, ex, seq_len, answer=c)[:2] for c in ex.choices]
    # targets are IGNORE over the prompt but its last token, whose target is the answer's first
    prompts = [x[:y.count(IGNORE) + 1] for x, y in encoded]
    return min(prompts, key=len), [y[y.count(IGNORE):] for _, y in encoded]


ROUTING_SUMS = ("entropy_sum", "top_half", "tokens")  # routing_stats' sums after the k share sums


def _routing_sums(model, layers, mask):
    """(layers, k + 3) float64 of the last forward over the tokens in mask: per layer the k share
    sums, the routing-entropy sum, the tokens whose top share > 1/2 and the token count (what
    routing_by_task accumulates)."""
    stats = teamlora.routing_stats(model, mask)
    return torch.stack([torch.cat([stats[n]["weight_sum"].double(),
                                   torch.tensor([stats[n][key] for key in ROUTING_SUMS],
                                                dtype=torch.float64)])
                        for n in layers])


@torch.no_grad()
def choice_scores(model, tok, examples, seq_len, batch_size=32, routing=None):
    """Per example, each choice's score: the summed log-probability of its answer tokens and EOS.

    Each prompt runs once: all but its last token fill the KV cache, then every choice is one row
    continuing from it, [last prompt token] + answer with targets answer + EOS. Examples of one
    task whose prompts have one length share a prefill, up to batch_size choice rows. routing: a
    dict to fill with {task: _routing_sums over each example's prompt and gold answer}, the tokens
    routing_by_task looks at, so that evaluation needs no second forward.
    """
    layers = [name for name, layer in teamlora.adapter_layers(model) if layer.routed] if routing is not None else []
    key = lambda item: (examples[item[0]].task, len(item[1]))  # noqa: E731
    groups = []  # runs of one key, cut at batch_size choice rows
    for item in sorted(((i, *_shared_prompt(tok, ex, seq_len)) for i, ex in enumerate(examples)), key=key):
        if groups and key(groups[-1][0]) == key(item) and \
                sum(len(a) for _, _, a in groups[-1]) + len(item[2]) <= batch_size:
            groups[-1].append(item)
        else:
            groups.append([item])
    scores = [None] * len(examples)
    try:  # one KV cache for every group: grown to the largest group's rows x (prompt + longest choice)
        for group in tqdm(groups, desc="scoring choices", leave=False, disable=_rank_world()[0] != 0):
            _score_group(model, tok, examples, group, layers, routing, scores)
    finally:
        model.clear_cache()
    return scores


def _score_group(model, tok, examples, group, layers, routing, scores):
    """choice_scores for one group of examples sharing a prompt length: one prefill, one row per choice."""
    device = _device(model)
    # one row per choice: (its example in the group, the choice's index, its answer ids + EOS)
    rows = [(g, j, a) for g, (_, _, answers) in enumerate(group) for j, a in enumerate(answers)]
    tokens = torch.full((len(rows), max(len(a) for _, _, a in rows)), tok.pad_id, dtype=torch.long)  # (R, C)
    targets = torch.full_like(tokens, IGNORE)
    for r, (g, _, a) in enumerate(rows):
        tokens[r, :len(a)] = torch.tensor([group[g][1][-1]] + a[:-1])
        targets[r, :len(a)] = torch.tensor(a)
    prompts = torch.tensor([p[:-1] for _, p, _ in group], device=device)  # (G, L - 1)
    task, start = examples[group[0][0]].task, prompts.shape[1]
    model.setup_cache(len(rows), start + tokens.shape[1])  # reused when large enough: no allocation
    if start > 0:  # targets all IGNORE: the prompts only fill the cache, no output layer runs
        model(prompts, torch.full_like(prompts, IGNORE), reduction="none")
        if layers:
            routing[task] = routing.get(task, 0) + _routing_sums(model, layers, None)
    # row r continues its example's prompt: the prompt's positions copied, nothing past them
    model.select_cache(torch.tensor([g for g, _, _ in rows], device=device), start)
    logp = -model(tokens.to(device), targets.to(device), reduction="none", start_pos=start).sum(1)  # (R,)
    if layers:  # the gold rows' inputs: the last prompt token and the answer (its EOS is only a target)
        gold = torch.zeros(tokens.shape, dtype=torch.bool)
        for r, (g, j, a) in enumerate(rows):
            ex = examples[group[g][0]]
            gold[r, :len(a)] = ex.choices[j] == ex.output
        routing[task] = routing.get(task, 0) + _routing_sums(model, layers, gold)
    logp, r = logp.tolist(), 0
    for i, _, answers in group:
        scores[i], r = logp[r:r + len(answers)], r + len(answers)


@torch.no_grad()
def score_choices(model, tok, examples, seq_len, batch_size=32, routing=None):
    """Index of the most likely choice of each example (choice_scores; batch_size counts choice rows).

    The score is the summed log-probability of the choice's answer tokens and EOS: the probability
    of generating exactly that answer and stopping. It favours short labels, since every extra
    token multiplies in one more probability below 1; most built-in labels are one SentencePiece
    token, users' labels may not be. Averaging per token would trade that bias for
    the opposite one, so the score stays the answer's probability.
    """
    scores = choice_scores(model, tok, examples, seq_len, batch_size, routing)
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


@torch.no_grad()
def generate_answers(model, tok, examples, seq_len, max_new_tokens=32, batch_size=32):
    """Greedy answers (decoded, stripped), at most max_new_tokens each, after a prompt that is
    shortened like a training example's to fit seq_len."""
    # With an empty answer, encode_example's inputs are bos + prompt, truncated the same way.
    prompts = [encode_example(tok, ex, seq_len, answer="")[0] for ex in examples]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    answers = [""] * len(prompts)
    for chunk in _batches(order, batch_size, "generating"):
        out = model.generate([prompts[i] for i in chunk], max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
        for i, ids in zip(chunk, out):
            answers[i] = tok.decode(ids).strip()
    return answers


@torch.no_grad()
def routing_by_task(model, tok, examples, seq_len, batch_size=32, collected=None):
    """How each task's tokens are routed: teamlora.routing_stats over one forward of each example's
    prompt + gold answer, real (non-padding) tokens only. Per task: "tokens", "layers" {name: mean
    share per expert}, "mean" (the layers' average), "entropy" (mean per-token routing entropy,
    nats), "load_entropy" (entropy of "mean"; log k when the load is even), "top_half" (the share of
    tokens whose top expert holds more than half the weight) and "entropy_norm" (entropy / log k),
    both averaged over layers and also per layer ("layers_top_half", "layers_entropy_norm"). {} if unrouted.
    collected: the routing dict that choice_scores filled while scoring; tasks with choices then
    take their sums from it instead of a forward of their own.
    Distributed: each rank routes examples[rank::world] (or scored its share), sums are all_reduced."""
    layers = [name for name, layer in teamlora.adapter_layers(model) if layer.routed]
    if not layers:
        return {}
    k = model.get_submodule(layers[0]).k
    tasks = sorted({ex.task for ex in examples})
    scored = {ex.task for ex in examples if ex.choices} if collected is not None else set()
    rank, world = _rank_world()
    sums = torch.zeros(len(tasks), len(layers), k + len(ROUTING_SUMS), dtype=torch.float64)  # k shares, ROUTING_SUMS
    for t, task in enumerate(tasks):
        if task in scored:
            sums[t] += collected.get(task, 0)  # absent: this rank scored no example of the task
            continue
        items = sorted((encode_example(tok, ex, seq_len)[:2] for ex in examples[rank::world] if ex.task == task),
                       key=lambda item: -len(item[0]))
        for chunk in _batches(items, batch_size, f"routing {task}"):
            _, batch = _forward(model, chunk, tok)
            lengths = torch.tensor([len(x) for x, _ in chunk])
            real = torch.arange(batch["tokens"].shape[1]) < lengths[:, None]  # (B, T), false on padding
            sums[t] += _routing_sums(model, layers, real)
    return _routing_table(_all_reduce(sums, model), tasks, layers)


def _routing_table(sums, tasks, layers):
    """routing_by_task's dict from sums (tasks, layers, k + 3) of _routing_sums, summed over ranks."""
    k = sums.shape[-1] - len(ROUTING_SUMS)
    out = {}
    for t, task in enumerate(tasks):
        tokens = sums[t, 0, -1].clamp(min=1)  # every layer sees the same tokens
        shares = sums[t, :, :k] / tokens  # (layers, k)
        mean = shares.mean(0)
        top, norm = sums[t, :, k + 1] / tokens, sums[t, :, k] / tokens / (math.log(k) or 1.0)  # (layers,) each
        out[task] = {"tokens": int(sums[t, 0, -1]), "layers": {n: s.tolist() for n, s in zip(layers, shares)},
                     "mean": mean.tolist(), "entropy": (sums[t, :, k].sum() / tokens / len(layers)).item(),
                     "load_entropy": teamlora.routing_entropy(mean).item(), "top_half": top.mean().item(),
                     "entropy_norm": norm.mean().item(), "layers_top_half": dict(zip(layers, top.tolist())),
                     "layers_entropy_norm": dict(zip(layers, norm.tolist()))}
    return out


def _all_reduce(t, model):
    """A CPU tensor summed over ranks (the collective runs on the model's device)."""
    return common.all_reduce(t, _device(model)).cpu()


def majority_labels(train):
    """The majority-class baseline's answer of each task with choices: its most frequent training
    answer (ties: the one seen first). Tasks without choices have none: with answers that are
    mostly unique, always giving the most frequent one measures nothing."""
    return {task: Counter(ex.output for ex in train if ex.task == task).most_common(1)[0][0]
            for task in dict.fromkeys(ex.task for ex in train if ex.choices)}


def _prediction(ex, predicted, score):
    """One line of predictions.jsonl. score: the chosen choice's log-likelihood, or ROUGE-L."""
    correct = predicted == ex.output if ex.choices else bool(exact_match(predicted, ex.output))
    return {"task": ex.task, "input": ex.input, "gold": ex.output, "predicted": predicted, "score": score,
            "correct": correct}


def _gather(items, world):
    """items[i] belongs to example rank + i * world (each rank holds its examples[rank::world]):
    every rank's items, on every rank, back in the examples' order."""
    if world == 1:
        return items
    parts = [None] * world
    dist.all_gather_object(parts, items)
    return [p[i] for i in range(len(parts[0])) for p in parts if i < len(p)]


@torch.no_grad()
def evaluate(model, tok, examples, seq_len, batch_size=32, max_new_tokens=32, limit=None, routing=True,
             majority=None, predictions=None):
    """Scores per task, their average, the majority-class baseline and (routing=True) routing_by_task
    and, for shapley routers, analyses.interaction (eval.json's "interaction").

    limit: at most that many examples per task, the first ones. majority: {task: answer}, the
    baseline's answers (majority_labels of the training split); a task without one scores None.
    predictions: a list to extend with one dict per evaluated example (_prediction), task by task
    in the examples' order (every rank passes one: they are gathered). Every rank passes the same
    examples and gets the same dict back; each scores examples[rank::world], counts are all_reduced.
    """
    by_task = {}
    for ex in examples:
        group = by_task.setdefault(ex.task, [])
        if limit is None or len(group) < limit:
            group.append(ex)
    tasks = sorted(by_task)
    majority = majority or {}
    rank, world = _rank_world()
    was_training = model.training
    model.eval()
    try:
        counts = []  # per task: a flattened confusion matrix, or [n, exact-match sum, ROUGE-L sum]
        routed = {}  # routing sums that choice scoring collects on its way (routing_by_task's collected)
        my_predictions = []  # per task, this rank's _prediction dicts
        for task in tasks:
            exs, mine = by_task[task], by_task[task][rank::world]
            gold = [ex.output for ex in mine]
            if exs[0].choices:
                labels = list(dict.fromkeys(c for ex in exs for c in ex.choices))  # the same on every rank
                scored = choice_scores(model, tok, mine, seq_len, batch_size, routed if routing else None)
                picked = [max(range(len(s)), key=s.__getitem__) for s in scored]  # as score_choices picks
                answers = [ex.choices[i] for ex, i in zip(mine, picked)]
                counts.append(confusion(answers, gold, labels).flatten())
                per_example = [s[i] for s, i in zip(scored, picked)]  # the chosen choice's log-likelihood
            else:
                answers = generate_answers(model, tok, mine, seq_len, max_new_tokens, batch_size)
                per_example = list(map(rouge_l, answers, gold))
                counts.append(torch.tensor([len(mine), sum(map(exact_match, answers, gold)), sum(per_example)],
                                           dtype=torch.float64))
            my_predictions.append(list(map(_prediction, mine, answers, per_example)))
        counts = _all_reduce(torch.cat(counts), model).split([len(c) for c in counts]) if counts else []
        scores = {}
        for task, c in zip(tasks, counts):
            if by_task[task][0].choices:
                cm = c.view(math.isqrt(len(c)), -1)
                scores[task] = {"n": int(cm.sum()), "accuracy": accuracy(cm), "macro_f1": macro_f1(cm)}
            else:
                scores[task] = {"n": int(c[0]), "exact_match": (c[1] / c[0]).item(), "rouge_l": (c[2] / c[0]).item()}
        # The baseline a model must beat: always give the task's most frequent training answer.
        always = {t: majority.get(t) for t in tasks}
        baseline = {t: None if a is None else sum(ex.output == a for ex in by_task[t]) / len(by_task[t])
                    for t, a in always.items()}
        results = {"average": _mean(headline(s) for s in scores.values()), "tasks": scores,
                   "majority": {"average": _mean(baseline.values()), "tasks": baseline, "answers": always},
                   "routing": routing_by_task(model, tok, [ex for t in tasks for ex in by_task[t]], seq_len,
                                              batch_size, routed) if routing else {}}
        if routing and (interaction := analyses.interaction(model)):  # shapley routers: their matrices M
            results["interaction"] = interaction
        if predictions is not None:
            predictions.extend(p for mine in my_predictions for p in _gather(mine, world))
    finally:
        model.train(was_training)
    return results


def _mean(values):
    """The mean; None when there are no values, or when one is None (an average over fewer tasks
    would not compare with the others)."""
    values = list(values)
    return sum(values) / len(values) if values and None not in values else None


def analyze(model, tok, examples, seq_len, args, full):
    """With --knockout, eval.json's "knockout": every variant scored as `full` was, without routing
    statistics (evaluate adds the other analyses, "interaction", itself)."""
    out = {}
    if args.knockout:
        limit = args.limit or None

        def score():
            return _headlines(evaluate(model, tok, examples, seq_len, args.batch_size, args.max_new_tokens, limit,
                                       routing=False))

        out["knockout"] = analyses.knockout(model, score, _headlines(full))
    return out


def _headlines(results):
    """evaluate's results cut to what the knock-out table shows: the average and each task's headline."""
    return {"average": results["average"], "tasks": {t: headline(s) for t, s in results["tasks"].items()}}


# ----------------------------------------------------------------------------- lm-evaluation-harness


def run_harness(args):
    """--harness: lm-eval's tasks on the run's model (--ckpt) or on a base alone (--base), with the
    routing table of the same forwards; rank 0 prints lm-eval's table and writes OUT/harness.json."""
    try:
        import harness
    except ImportError as e:
        raise UserError(f"--harness needs lm-evaluation-harness: pip install lm-eval ({e})") from None
    with common.distributed(args.device) as (rank, _, device):
        if args.ckpt:
            ckpt, base, tok = common.open_run(args.ckpt, args.base)
            model = load_for_eval(ckpt, base, device)
            info = {"ckpt": str(args.ckpt), "method": ckpt["config"]["method"], "base": str(base)}
        else:
            base = common.base_dir(args.base)
            tok = common.check_base(base)[0]
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # as load_for_eval's base
            model = Transformer.from_pretrained(base, dtype=dtype, device=device)
            info = {"ckpt": None, "method": None, "base": str(base)}
        layers = [name for name, layer in teamlora.adapter_layers(model) if layer.routed]
        lm = harness.ProjectLM(model, tok, args.batch_size, routing=(lambda mask: _routing_sums(model, layers, mask))
                               if layers else None, info=info)
        try:
            results = harness.evaluate(lm, args.harness.split(","), args.harness_include, args.limit or None,
                                       args.num_fewshot)
        except harness.UnknownTaskError as e:
            raise UserError(f"--harness: {e}") from None
        tasks = lm.routed_tasks()
        empty = torch.zeros(len(layers), model.get_submodule(layers[0]).k + len(ROUTING_SUMS),
                            dtype=torch.float64) if layers else None
        routing = _routing_table(_all_reduce(torch.stack([lm.routing_sums.get(t, empty) for t in tasks]), model),
                                 tasks, layers) if tasks else {}
        if rank == 0:
            print(harness.table(results) + ("\n" + report.format_routing(routing) if routing else ""))
            if args.ckpt:
                harness.save({**results, "routing": routing}, Path(args.ckpt) / "harness.json")


# ----------------------------------------------------------------------------- command line


def load_for_eval(ckpt, base, device):
    """A run's model as it is evaluated (here and in train.py's final evaluation): a bf16 base on
    GPUs (float32 on CPUs), the trained tensors loaded into it (adapters stay float32 either way)."""
    return common.load_model(ckpt, base, device, torch.bfloat16 if device.type == "cuda" else torch.float32)


def generate(out_dir, prompt, max_new_tokens=32, base=None, device=None):
    """The prompt and its greedy continuation by a train.py run (its base with its adapters)."""
    device = common.default_device(device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # adapters stay float32 either way
    model, tok, _ = common.load_run(out_dir, device, dtype, base=base)
    [new] = model.generate([tok.encode(prompt, bos=True, eos=False)], max_new_tokens, eos_id=tok.eos_id)
    return prompt + tok.decode(new)


def check_args(p, args):
    """Every flag's rule, before a run, a mixture or a weight is read: one line naming the flag
    (p.error: exit status 2)."""
    for flag, least in (("limit", 0), ("batch_size", 1), ("max_new_tokens", 1)):
        if getattr(args, flag) < least:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least {least}")
    if (why := common.check_device(args.device)) is not None:
        p.error(f"--device {why}")
    if not (args.ckpt or args.compare or (args.harness and args.base)):
        p.error("one of --ckpt OUT, --compare OUT... or --base BASE --harness TASKS is needed")
    if (args.harness_include or args.num_fewshot is not None) and not args.harness:
        p.error("--harness-include and --num-fewshot go with --harness")
    if args.harness and (args.compare or args.export or args.data or args.prompt is not None):
        p.error("--harness runs lm-eval's tasks: it does not go with --compare, --export, --prompt or --data")
    if args.prompt is not None and (not args.ckpt or args.export):
        p.error("--prompt needs --ckpt OUT, and no --export")
    if args.export and not args.ckpt:
        p.error("--export needs --ckpt OUT")
    if args.export and Path(args.export).exists() and not Path(args.export).is_dir():
        p.error(f"--export {args.export}: a file, not a directory")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--ckpt", metavar="OUT", help="a train.py output directory: prints the tables and writes "
                      "OUT/eval.json (what --compare reads), OUT/predictions.jsonl and OUT/routing.png, replacing "
                      "those of the final evaluation in training or of an earlier eval.py")
    what.add_argument("--compare", nargs="+", metavar="OUT", help="evaluated runs (eval.json) side by side: one "
                      "row per setup, the runs that differ only in --seed grouped into one (mean ± sd); a run "
                      "named twice, or a copy of one, is refused")
    p.add_argument("--data", help="mixture to test on; its train split gives the majority baseline "
                   "(default: the one the run trained on)")
    p.add_argument("--base", help="where the base model is now, if it moved since training (default: where it was)")
    p.add_argument("--limit", type=int, default=0, help="at most N test examples per task; 0 = all, as train.py's "
                   "--eval-limit (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward (default: 32)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="answer length for tasks without choices, and "
                   "for --prompt (default: 32)")
    p.add_argument("--device", help="default: cuda if there is a GPU, else cpu")
    p.add_argument("--knockout", action="store_true", help="routed runs: also score the test split with only "
                   "each token's top-1 expert, each expert dropped, each alone (2 k + 1 more evaluations; "
                   "eval.json's \"knockout\", see analyses.py)")
    p.add_argument("--harness", metavar="TASKS", help="instead of the mixture's test split, run lm-evaluation-harness "
                   "tasks (comma-separated, lm-eval's names: boolq,piqa,arc_easy,...) on the run's model, or with "
                   "--base and no --ckpt on the base alone; writes OUT/harness.json (needs pip install lm-eval)")
    p.add_argument("--harness-include", metavar="DIR", help="a folder of your own lm-eval task YAMLs (lm-eval's "
                   "include path)")
    p.add_argument("--num-fewshot", type=int, help="few-shot examples per lm-eval task (default: the task's own, else 0)")
    p.add_argument("--export", metavar="DIR", help="instead of evaluating, write the run's adapters for "
                   "Hugging Face models (LoRA: a PEFT directory; see export.py); an earlier export in DIR is "
                   "replaced whole, a directory holding other files is refused")
    p.add_argument("--prompt", help="instead of evaluating, print this text and its greedy continuation by the run "
                   "(--ckpt); the text is the model's input as written (fine-tuned adapters expect the training "
                   "prompt template, data.py)")
    args = p.parse_args(argv)
    check_args(p, args)
    if args.knockout and (not args.ckpt or args.export or args.prompt is not None or args.harness):
        p.error("--knockout needs --ckpt OUT, and no --export, --prompt or --harness")
    if args.harness:
        return run_harness(args)
    if args.prompt is not None:
        print(generate(args.ckpt, args.prompt, args.max_new_tokens, args.base, args.device))
        return
    if args.export:
        from export import check_export_dir, export_adapters, load_adapters
        check_export_dir(args.export)  # before anything is read
        export_adapters(*load_adapters(args.ckpt, base=args.base), args.export)  # the base's weights stay unread
        return
    if args.compare:
        print(report.compare(args.compare))
        return
    with common.distributed(args.device) as (rank, _, device):
        ckpt, base, tok = common.open_run(args.ckpt, args.base)  # the checks first, then the weights
        config = ckpt["config"]
        if args.knockout and config["method"] in ("lora", "full"):
            raise UserError(f"--knockout: {args.ckpt} is a {config['method']} run, it has no experts to knock out "
                            "(routed methods: moelora, hydralora, teamlora)")
        data = args.data or config["data"]  # as given, for eval.json; read from where the run found it
        train, test = load_mixture(args.data or common.run_data(ckpt))
        if not test:
            raise UserError(f"no test split in {data}: nothing to evaluate (--data names a mixture with one)")
        model = load_for_eval(ckpt, base, device)
        predictions = []
        results = evaluate(model, tok, test, config["seq_len"], args.batch_size, args.max_new_tokens,
                           args.limit or None, majority=majority_labels(train), predictions=predictions)
        results.update(analyze(model, tok, test, config["seq_len"], args, results))
        if rank == 0:
            report.write_results(args.ckpt, {**results, "data": data, "limit": args.limit or None}, predictions)


if __name__ == "__main__":
    cli(main)
