"""eval.py: metrics on hand-computed cases, choice scoring on rigged models, routing statistics,
evaluation in one process and under two gloo ranks, checkpoints, the comparison table.

    python -m pytest -q tests/test_eval.py
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import common
import data
import eval as ev
import metrics
import report
import teamlora
from data import IGNORE, Example
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 128

# ----------------------------------------------------------------------------- metrics


def test_accuracy_and_macro_f1_on_an_unbalanced_task():
    gold = ["ham"] * 9 + ["spam"]
    always_ham = ["ham"] * 10
    labels = ["ham", "spam"]
    assert metrics.accuracy(metrics.confusion(always_ham, gold, labels)) == pytest.approx(0.9)
    # F1(ham) = 2*9 / (2*9 + 1 FP + 0 FN) = 18/19; F1(spam) = 0 (its one example missed): mean 9/19.
    assert metrics.macro_f1(metrics.confusion(always_ham, gold, labels)) == pytest.approx(9 / 19)
    # A label neither gold nor predicted is skipped, not counted as F1 = 0.
    assert metrics.macro_f1(metrics.confusion(always_ham, gold, labels + ["phishing"])) == pytest.approx(9 / 19)
    # The spam found, one ham lost: ham TP 8 FN 1 -> F1 16/17; spam TP 1 FP 1 -> F1 2/3.
    pred = ["ham"] * 8 + ["spam", "spam"]
    assert metrics.accuracy(metrics.confusion(pred, gold, labels)) == pytest.approx(0.9)
    assert metrics.macro_f1(metrics.confusion(pred, gold, labels)) == pytest.approx((16 / 17 + 2 / 3) / 2)
    with pytest.raises(ValueError, match="not one of"):
        metrics.confusion(["eggs"], ["ham"], labels)


def test_exact_match_and_rouge_l():
    assert metrics.exact_match(" Neutral\n", "neutral") == 1.0  # case and surrounding whitespace ignored
    assert metrics.exact_match("the  cat", "the cat") == 1.0
    assert metrics.exact_match("neutral.", "neutral") == 0.0
    # LCS("the cat sat on the mat", "the cat is on a mat") = the cat on mat = 4; P = R = 4/6.
    assert metrics.rouge_l("the cat sat on the mat", "the cat is on a mat") == pytest.approx(2 / 3)
    # LCS("a b c d", "b d e") = b d = 2; P = 2/4, R = 2/3, F = 2PR/(P+R) = 4/7.
    assert metrics.rouge_l("a b c d", "b d e") == pytest.approx(4 / 7)
    assert metrics.rouge_l("x y", "z") == 0.0
    assert metrics.rouge_l("", "") == 1.0 and metrics.rouge_l("x", "") == 0.0


# ----------------------------------------------------------------------------- choice scoring


class Bigram(nn.Module):
    """A stand-in LM: the logits after a token are one row of a table, zero (uniform) until rigged.
    It looks at one token only, so its KV cache has nothing to hold."""

    def __init__(self, vocab):
        super().__init__()
        self.table = nn.Embedding(vocab, vocab)
        nn.init.zeros_(self.table.weight)

    def forward(self, tokens, targets=None, reduction="mean", start_pos=0):
        logits = self.table(tokens)  # (B, T, V)
        if targets is None:
            return logits
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction=reduction)
        return loss.view_as(targets) if reduction == "none" else loss

    def setup_cache(self, *shape):
        pass

    select_cache = clear_cache = setup_cache

    @torch.no_grad()
    def rig(self, tok, ex, answer):
        """Make the last prompt token -> answer tokens -> EOS chain near-certain."""
        x, y, _ = data.encode_example(tok, ex, SEQ_LEN, answer=answer)
        first = next(i for i, t in enumerate(y) if t != IGNORE)
        chain = [x[first]] + y[first:]
        for a, b in zip(chain, chain[1:]):
            self.table.weight[a, b] = 30.0
        return chain[1:-1]  # the answer's tokens


def sentiment(output, choices, text="A film."):
    return Example("sentiment", "Is the review positive or negative?", text, output, choices)


def test_score_choices_picks_the_rigged_answer_in_any_choice_order(sp_tokenizer):
    tok = sp_tokenizer
    model = Bigram(tok.n_words)
    nli = Example("nli", "Does the premise entail the hypothesis?", "Premise: a. Hypothesis: b.", "neutral",
                  ["entailment", "neutral", "contradiction"])
    examples = [sentiment("positive", ["positive", "negative"]), sentiment("positive", ["negative", "positive"]),
                nli, sentiment("positive", ["negative", "positive"], "A much longer review of a film, so padded.")]
    model.rig(tok, examples[0], "positive")
    model.rig(tok, nli, "neutral")
    # batch_size 2: the four examples' nine sequences are sorted by length and split across batches
    assert ev.score_choices(model, tok, examples, SEQ_LEN, batch_size=2) == [0, 1, 1, 1]


def test_summed_likelihood_length_bias_and_a_model_that_overcomes_it(sp_tokenizer):
    tok = sp_tokenizer
    ex = Example("qa", "Is it true?", "", "no", ["yes it is true", "no"])
    model = Bigram(tok.n_words)
    # A uniform model gives each token probability 1/V, so the choice with fewer tokens wins: the
    # known bias of summed log-likelihood.
    assert ev.score_choices(model, tok, [ex], SEQ_LEN) == [1]
    long = model.rig(tok, ex, "yes it is true")
    assert len(long) > len(tok.encode("no", bos=False, eos=False))
    assert ev.score_choices(model, tok, [ex], SEQ_LEN) == [0]


@pytest.fixture(scope="module")
def tiny(sp_tokenizer):
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=sp_tokenizer.n_words, hidden_dim=48,
                                 max_seq_len=SEQ_LEN)).eval()


def first_per_task(examples, n):
    return [ex for task in sorted({e.task for e in examples}) for ex in [e for e in examples if e.task == task][:n]]


def test_batching_changes_no_choice_and_no_answer(tiny, sp_tokenizer, builtin_mixture):
    tok = sp_tokenizer
    examples = first_per_task(builtin_mixture[1], 3)
    alone = ev.score_choices(tiny, tok, examples, SEQ_LEN, batch_size=1)
    assert ev.score_choices(tiny, tok, examples, SEQ_LEN, batch_size=64) == alone
    # Generation sorts prompts by length; the answers come back in the examples' order.
    copy = [Example("copy", "Repeat the last word.", " ".join(["red dog"] * n), "dog") for n in (1, 5, 2)]
    alone = [ev.generate_answers(tiny, tok, [ex], SEQ_LEN, max_new_tokens=5)[0] for ex in copy]
    assert ev.generate_answers(tiny, tok, copy, SEQ_LEN, max_new_tokens=5, batch_size=2) == alone


def scores_one_forward_per_choice(model, tok, examples, prompt_of=None):
    """The scores as main computed them: a full forward of prompt + answer + EOS for every choice,
    log-softmax of the logits at the answer positions. prompt_of(ex) forces one prompt on every choice."""
    scores = []
    for ex in examples:
        row = []
        for c in ex.choices:
            x, y, _ = data.encode_example(tok, ex, SEQ_LEN, answer=c)
            if prompt_of:
                answer = y[y.count(IGNORE):]
                x, y = prompt_of(ex) + answer[:-1], [IGNORE] * (len(prompt_of(ex)) - 1) + answer
            logits = model(torch.tensor([x]))[0]
            y = torch.tensor(y)
            row.append(logits[y != IGNORE].log_softmax(-1).gather(-1, y[y != IGNORE, None]).sum().item())
        scores.append(row)
    return scores


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_choice_scores_equal_one_forward_per_choice(tiny, sp_tokenizer, builtin_mixture, batch_size):
    """Each prompt runs once into the KV cache; every choice continues from it: the same scores."""
    tok = sp_tokenizer
    fits = [ex for ex in builtin_mixture[1] if not any(data.encode_example(tok, ex, SEQ_LEN, c)[2] for c in ex.choices)]
    examples = first_per_task(fits, 4)
    new = ev.choice_scores(tiny, tok, examples, SEQ_LEN, batch_size=batch_size)
    old = scores_one_forward_per_choice(tiny, tok, examples)
    assert [len(s) for s in new] == [len(ex.choices) for ex in examples]
    for a, b in zip(new, old):
        assert a == pytest.approx(b, abs=1e-5, rel=1e-5)


def test_truncated_input_every_choice_sees_the_same_prompt(tiny, sp_tokenizer):
    """An input too long for seq_len is cut once, leaving room for the longest choice: a short
    choice is not scored against more of the input than a long one."""
    tok = sp_tokenizer
    choices = ["yes", "no it is not so, not at all, never"]
    ex = Example("qa", "Is it so?", " ".join(["a long input that will not fit"] * 40), "yes", choices)
    prompts = [data.encode_example(tok, ex, SEQ_LEN, answer=c) for c in choices]
    prompts = [x[:y.count(IGNORE) + 1] for x, y, truncated in prompts if truncated]
    shortest = min(prompts, key=len)
    [new] = ev.choice_scores(tiny, tok, [ex], SEQ_LEN)
    [shared] = scores_one_forward_per_choice(tiny, tok, [ex], prompt_of=lambda ex: shortest)
    assert new == pytest.approx(shared, abs=1e-5, rel=1e-5)
    if len({len(p) for p in prompts}) > 1:  # encode_example cuts by each choice's length: main's bug was here
        [apart] = scores_one_forward_per_choice(tiny, tok, [ex])
        assert apart[1] == pytest.approx(new[1], abs=1e-5) and apart[0] != new[0]  # the short choice saw more input


# ----------------------------------------------------------------------------- routing


def routed(model, method="teamlora", seed=0):
    teamlora.add_adapters(model, method, rank=2, experts=3, targets=("w1", "w2", "w3"))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # fresh B are zero; random adapters make the routing matter
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_gate"):
                p.copy_(torch.randn(p.shape, generator=g))
    return model.eval()


def test_routing_shares_sum_to_one_over_real_tokens_only(sp_tokenizer, builtin_mixture):
    tok = sp_tokenizer
    torch.manual_seed(0)
    model = routed(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words, hidden_dim=48,
                                         max_seq_len=SEQ_LEN)))
    examples = first_per_task(builtin_mixture[1], 5)
    stats = ev.routing_by_task(model, tok, examples, SEQ_LEN, batch_size=4)  # mixed lengths: padded batches
    assert set(stats) == {"nli", "sentiment", "spam", "supersense"}
    alone = ev.routing_by_task(model, tok, examples, SEQ_LEN, batch_size=1)  # no padding at all
    for task, s in stats.items():
        real = sum(len(data.encode_example(tok, ex, SEQ_LEN)[0]) for ex in examples if ex.task == task)
        assert s["tokens"] == alone[task]["tokens"] == real
        assert len(s["layers"]) == 6  # w1, w2, w3 in 2 blocks
        for shares in s["layers"].values():
            assert sum(shares) == pytest.approx(1.0, abs=1e-6)
        assert sum(s["mean"]) == pytest.approx(1.0, abs=1e-6)
        assert 0 <= s["entropy"] <= math.log(3) + 1e-6 and 0 <= s["load_entropy"] <= math.log(3) + 1e-6
        # Padding positions are left out: the padded batches give the unpadded shares.
        assert s["mean"] == pytest.approx(alone[task]["mean"], abs=1e-5)
        assert s["entropy"] == pytest.approx(alone[task]["entropy"], abs=1e-5)
    lora = routed(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tok.n_words)), "lora")
    assert ev.routing_by_task(lora, tok, examples, SEQ_LEN) == {}


def test_routing_collected_while_scoring_equals_its_own_forward(sp_tokenizer, builtin_mixture):
    """choice_scores(routing=...) sees each prompt + gold answer once: the sums routing_by_task gets by itself."""
    tok = sp_tokenizer
    torch.manual_seed(0)
    model = routed(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=tok.n_words, hidden_dim=48,
                                         max_seq_len=SEQ_LEN)))
    fits = [ex for ex in builtin_mixture[1] if not any(data.encode_example(tok, ex, SEQ_LEN, c)[2] for c in ex.choices)]
    examples = first_per_task(fits, 3)
    collected = {}
    ev.score_choices(model, tok, examples, SEQ_LEN, batch_size=4, routing=collected)
    assert set(collected) == {"nli", "sentiment", "spam", "supersense"}
    via_scoring = ev.routing_by_task(model, tok, examples, SEQ_LEN, collected=collected)
    alone = ev.routing_by_task(model, tok, examples, SEQ_LEN)
    for task, s in alone.items():
        assert via_scoring[task]["tokens"] == s["tokens"]
        for name, shares in s["layers"].items():
            assert via_scoring[task]["layers"][name] == pytest.approx(shares, abs=1e-5)
        assert via_scoring[task]["entropy"] == pytest.approx(s["entropy"], abs=1e-5)


# ----------------------------------------------------------------------------- evaluation


def test_evaluate_counts_a_rigged_model_exactly(sp_tokenizer, builtin_mixture):
    tok = sp_tokenizer
    examples = first_per_task(builtin_mixture[1], 40)
    spam = [ex for ex in examples if ex.task == "spam"]
    model = Bigram(tok.n_words)
    model.rig(tok, spam[0], "ham")  # ham on every spam example
    model.train()
    majority = ev.majority_labels(builtin_mixture[0])
    results = ev.evaluate(model, tok, examples, SEQ_LEN, limit=20, majority=majority)
    assert model.training  # restored
    n_ham = sum(ex.output == "ham" for ex in spam[:20])
    s = results["tasks"]["spam"]
    assert s["n"] == 20 and s["accuracy"] == pytest.approx(n_ham / 20)
    assert s["macro_f1"] == pytest.approx((2 * n_ham / (2 * n_ham + 20 - n_ham) + 0.0) / 2)
    n_majority = sum(ex.output == majority["spam"] for ex in spam[:20])
    assert results["majority"]["tasks"]["spam"] == pytest.approx(n_majority / 20)
    assert set(results["tasks"]) == {"nli", "sentiment", "spam", "supersense"}
    assert results["average"] == pytest.approx(sum(t["accuracy"] for t in results["tasks"].values()) / 4)
    assert results["routing"] == {}
    table = report.format_table(results)
    for word in ("spam", "supersense", "average", "majority"):
        assert word in table


def test_majority_baseline_is_the_training_majority_on_choice_tasks_only(tiny, sp_tokenizer):
    """Mostly "spam" in training, mostly "ham" in the test split: the baseline answers "spam" and
    scores 1/5, not the test split's own majority 4/5. A generated task has no baseline ("-")."""
    spam = lambda output: Example("spam", "Spam or ham?", "Win a prize.", output, ["ham", "spam"])  # noqa: E731
    copy = lambda word: Example("copy", "Repeat the last word.", f"red {word}", word)  # noqa: E731
    train = [spam("spam"), spam("ham"), spam("spam"), spam("spam"), copy("dog"), copy("dog"), copy("cat")]
    test = [spam("ham")] * 4 + [spam("spam"), copy("bird"), copy("dog")]
    assert ev.majority_labels(train) == {"spam": "spam"}
    results = ev.evaluate(tiny, sp_tokenizer, test, SEQ_LEN, max_new_tokens=2, majority=ev.majority_labels(train))
    assert results["majority"]["tasks"] == {"spam": pytest.approx(1 / 5), "copy": None}
    assert results["majority"]["answers"] == {"spam": "spam", "copy": None}
    assert results["majority"]["average"] is None  # over one task of two: it would not compare with "average"
    rows = {line.split()[0]: line.split() for line in report.format_table(results).splitlines()[1:4]}
    assert rows["spam"][3] == "0.200" and rows["copy"][3] == "-" and rows["average"][3] == "-"


# ----------------------------------------------------------------------------- a run directory


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps({k: v for k, v in vars(ex).items() if k != "where" and v is not None}) + "\n"
                            for ex in examples))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, sp_tokenizer, builtin_mixture):
    """What train.py left before adapters.safetensors (a checkpoint.pt holding the adapters and a flat
    config; it must still load), a base directory (weights + tokenizer), a mixture and summary.json."""
    tmp = tmp_path_factory.mktemp("eval")
    base, mix, run = tmp / "base", tmp / "mix", tmp / "run"
    for d in (base, mix, run):
        d.mkdir()
    (base / "tokenizer.model").write_bytes(sp_tokenizer.path.read_bytes())
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=sp_tokenizer.n_words, hidden_dim=48,
                                  max_seq_len=SEQ_LEN))
    model.save_pretrained(base)
    words = "red green blue cat dog bird one two three".split()
    copy = [Example("copy", "Repeat the last word.", " ".join(words[i:i + 3]), words[i + 2]) for i in range(7)]
    train, test = builtin_mixture
    write_jsonl(mix / "train.jsonl", first_per_task(train, 3) + copy)
    write_jsonl(mix / "test.jsonl", first_per_task(test, 5) + copy)
    routed(model)
    config = {"method": "teamlora", "rank": 2, "experts": 3, "alpha": 32.0, "dropout": 0.05,
              "targets": ["w1", "w2", "w3"], "router": None, "seq_len": SEQ_LEN, "base": str(base), "data": str(mix)}
    torch.save({"config": config, "adapters": teamlora.adapter_state_dict(model), "step": 1}, run / "checkpoint.pt")
    (run / "summary.json").write_text(json.dumps(
        {"config": {**config, "seed": 0}, "trainable": 1234, "trainable_pct": 1.5,
         "router_params": 96, "train_time_s": 12.3, "tokens_per_s": 4000.0, "steps": 1}))
    return run, model


def test_load_run_rebuilds_the_adapted_model_from_an_older_checkpoint(run_dir, tmp_path):
    run, trained = run_dir
    model, tok, config = common.load_run(run)
    assert config["method"] == "teamlora" and not model.training
    x = torch.tensor([tok.encode("a dog and a cat", bos=True, eos=False)])
    torch.testing.assert_close(model(x), trained(x))
    # method "full": the whole state dict instead of adapters
    full = tmp_path / "full"
    full.mkdir()
    state = Transformer.from_pretrained(config["base"]).state_dict()
    state = {k: v + 0.01 for k, v in state.items()}
    torch.save({"config": {**config, "method": "full"}, "model": state, "step": 1}, full / "checkpoint.pt")
    model, _, _ = common.load_run(full)
    assert torch.equal(model.layers[0].attention.wq.weight, state["layers.0.attention.wq.weight"])


def test_main_one_process_then_two_gloo_ranks_agree(run_dir, capsys):
    run, _ = run_dir
    ev.main(["--ckpt", str(run), "--limit", "4", "--batch-size", "8", "--max-new-tokens", "4"])
    printed = capsys.readouterr().out
    one = json.loads((run / "eval.json").read_text())
    # interaction: the run is TeamLoRA with its shapley routers (tests/test_analyses.py checks the rest)
    assert set(one) == {"average", "tasks", "majority", "routing", "data", "limit", "interaction"} and one["limit"] == 4
    predicted = [json.loads(line) for line in open(run / "predictions.jsonl")]
    assert len(predicted) == 5 * 4 and set(predicted[0]) == {"task", "input", "gold", "predicted", "score", "correct"}
    for task, scores in one["tasks"].items():  # each line agrees with the scores
        mine = [p for p in predicted if p["task"] == task]
        assert sum(p["correct"] for p in mine) / 4 == pytest.approx(scores.get("accuracy", scores.get("exact_match")))
    assert all(p["score"] <= 0 for p in predicted if p["task"] != "copy")  # a log-likelihood
    assert str(run / "predictions.jsonl") in printed
    assert set(one["tasks"]) == {"copy", "nli", "sentiment", "spam", "supersense"}
    assert set(one["tasks"]["copy"]) == {"n", "exact_match", "rouge_l"}
    assert all(s["n"] == 4 for s in one["tasks"].values())
    assert one["routing"]["copy"]["tokens"] > 0
    assert "routing" in printed and "average" in printed
    assert "routing.png" in printed  # written, or said to be skipped without matplotlib
    # The same under torchrun: each rank scores half, counts are all_reduced, rank 0 writes; with
    # CUDA's placement rules checked (tests/placement.py): every collective gets device tensors.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/placement.py", "eval.py",
           "--ckpt", str(run), "--limit", "4", "--batch-size", "8", "--max-new-tokens", "4"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert sum(line.startswith("average") for line in res.stdout.splitlines()) == 1  # only rank 0 prints
    assert "replacing the earlier evaluation" in res.stdout
    two = json.loads((run / "eval.json").read_text())
    # rank 0 writes every rank's predictions, in the one-process order
    again = [json.loads(line) for line in open(run / "predictions.jsonl")]
    assert [(p["task"], p["input"], p["predicted"]) for p in again] == [(p["task"], p["input"], p["predicted"])
                                                                        for p in predicted]
    for task, scores in one["tasks"].items():
        assert two["tasks"][task] == pytest.approx(scores)
    assert two["average"] == pytest.approx(one["average"])
    for task, r in one["routing"].items():
        assert two["routing"][task]["tokens"] == r["tokens"]
        assert two["routing"][task]["mean"] == pytest.approx(r["mean"], abs=1e-5)


def test_compare_lists_every_run_and_names_a_missing_eval(run_dir, tmp_path):
    other = tmp_path / "lora"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps(
        {"config": {"method": "lora", "rank": 8, "experts": 4, "router": None, "seed": 0, "base": "org/base"},
         "adapter": {"method": "lora", "rank": 8}, "trainable": 999, "trainable_pct": 0.75, "router_params": 0,
         "train_time_s": 60.0, "tokens_per_s": 5000.0, "steps": 10}))
    with pytest.raises(FileNotFoundError, match=r"lora.eval\.json"):
        report.compare([other])
    (other / "eval.json").write_text(json.dumps(
        {"average": 0.625, "tasks": {"spam": {"n": 4, "accuracy": 0.75, "macro_f1": 0.5},
                                     "copy": {"n": 4, "exact_match": 0.5, "rouge_l": 0.6}},
         "majority": {"average": None, "tasks": {"spam": 0.75, "copy": None}}, "routing": {}}))
    run, _ = run_dir
    summary = json.loads((run / "summary.json").read_text())  # as train.py writes it: the router as used
    (run / "summary.json").write_text(json.dumps({**summary, "adapter": {"method": "teamlora", "router": "shapley"}}))
    (run / "eval.json").write_text(json.dumps(
        {"average": 0.8, "tasks": {"spam": {"n": 4, "accuracy": 0.8, "macro_f1": 0.7}},
         "majority": {"average": 0.75, "tasks": {"spam": 0.75}}, "routing": {}}))
    lines = report.compare([other, run]).splitlines()
    assert lines[0].split() == ["run", "base", "method", "rank", "experts", "router", "trainable%", "time_s",
                                "tokens/s", "n", "average", "copy", "spam"]
    lora = lines[1].split()
    assert lora[:3] == [str(other), "org/base", "lora"] and lora[-4:] == ["8", "0.625", "0.500", "0.750"]
    teamlora = lines[2].split()
    assert teamlora[:3] == [str(run), summary["config"]["base"], "teamlora"] and "shapley" in teamlora
    assert teamlora[-4:] == ["4", "0.800", "-", "0.800"]
    # Tested on other examples (here: other tasks), each run's own majority baseline has its row.
    assert lines[3].startswith(f"majority class of {other} ") and lines[3].split()[-4:] == ["8", "-", "-", "0.750"]
    assert lines[4].startswith(f"majority class of {run} ") and lines[4].split()[-4:] == ["4", "0.750", "-", "0.750"]
    assert "one majority row for each" in lines[-1]
    # Runs that differ only in the seed become one row of mean ± sd; one baseline, one row.
    seeds = []
    for seed, avg in ((1, 0.5), (2, 0.7)):
        d = tmp_path / f"lora-s{seed}"
        d.mkdir()
        s = json.loads((other / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "config": {**s["config"], "seed": seed}}))
        (d / "eval.json").write_text((other / "eval.json").read_text().replace("0.625", str(avg)))
        seeds.append(d)
    lines = report.compare(seeds).splitlines()
    assert len(lines) == 3 + 2  # header, lora (2 seeds), majority, two footnotes
    assert "(+1 seeds)" in lines[1] and "0.600 ± 0.141" in lines[1]
    assert lines[2].split()[:3] == ["majority", "class", "-"] and lines[2].split()[-4:] == ["8", "-", "-", "0.750"]


def test_routing_heatmap(tmp_path):
    pytest.importorskip("matplotlib")
    report.save_heatmap({"nli": {"mean": [0.7, 0.3]}, "spam": {"mean": [0.4, 0.6]}}, tmp_path / "routing.png")
    assert (tmp_path / "routing.png").read_bytes().startswith(b"\x89PNG")


def test_compare_averages_only_runs_that_differ_in_the_seed(tmp_path):
    """Any flag that changes training (balance, dropout, seq_len, batch size, temperature...) makes
    another setup; the seed and flags that only say how a run ran (out, eval limit...) do not."""
    config = {"method": "teamlora", "rank": 8, "experts": 4, "router": None, "balance": 0.0, "dropout": 0.05,
              "seq_len": 256, "batch_size": 8, "temperature": 1.0, "seed": 0, "out": "a", "eval_limit": 100}
    runs = {"base-s0": {}, "base-s1": {"seed": 1, "out": "b", "eval_limit": 50, "save_every": 7},
            "balance": {"balance": 0.1}, "dropout": {"dropout": 0.0}, "seq": {"seq_len": 128},
            "batch": {"batch_size": 4}, "temperature": {"temperature": 2.0}}
    for i, (name, change) in enumerate(runs.items()):
        d = tmp_path / name
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(
            {"config": {**config, **change}, "trainable_pct": 1.0, "train_time_s": 10.0, "tokens_per_s": 100.0}))
        (d / "eval.json").write_text(json.dumps({"average": 0.5 + i / 100, "tasks": {"spam": {"n": 1, "accuracy": 0.5}},
                                                 "majority": {"average": 0.5, "tasks": {"spam": 0.5}}}))
    elsewhere = tmp_path / "base-s2-tested-elsewhere"  # eval.py --data: the same setup, other test examples
    elsewhere.mkdir()
    (elsewhere / "summary.json").write_text((tmp_path / "base-s1" / "summary.json").read_text())
    (elsewhere / "eval.json").write_text(json.dumps({**json.loads((tmp_path / "base-s1" / "eval.json").read_text()),
                                                     "data": "elsewhere/"}))
    lines = report.compare([tmp_path / name for name in runs] + [elsewhere]).splitlines()
    assert len(lines) == 1 + 7 + 1 + 2  # header, 7 setups, majority, footnotes
    assert "(+1 seeds)" in lines[1] and sum("seeds" in line for line in lines[2:-1]) == 0
    assert lines[-4].startswith(str(elsewhere))


@pytest.mark.parametrize("argv", [["--ckpt", "nowhere"], ["--compare", "nowhere"], ["--ckpt"],
                                  ["--compare", "x", "--prompt", "hi"], ["--ckpt", "x", "--export", "y", "--prompt", "hi"],
                                  ["--ckpt", "nowhere", "--prompt", "hi"]])
def test_eval_user_errors_are_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        common.cli(ev.main, argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "error:" in err.strip().splitlines()[-1], err  # argparse: usage, then error


def test_load_run_finds_a_moved_base_with_base(run_dir, tmp_path):
    run, trained = run_dir
    config = torch.load(run / "checkpoint.pt", weights_only=True)["config"]
    moved = tmp_path / "moved"
    moved.mkdir()
    for f in Path(config["base"]).iterdir():
        (moved / f.name).write_bytes(f.read_bytes())
    gone = tmp_path / "gone"
    gone.mkdir()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "base": str(tmp_path / "nowhere")}}, gone / "checkpoint.pt")
    with pytest.raises(common.CheckpointError, match="--base"):
        common.load_run(gone)
    model, tok, _ = common.load_run(gone, base=str(moved))
    x = torch.tensor([tok.encode("a dog and a cat", bos=True, eos=False)])
    torch.testing.assert_close(model(x), trained(x))
