"""harness.py and eval.py --harness: lm-eval's model interface over the project's model, checked
against this project's own scorer and decoder, through lm-eval itself on local YAML tasks, and
under two gloo ranks. Skipped without lm-eval (pip install lm-eval).

    python -m pytest -q tests/test_harness.py
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import data
import eval as ev
import teamlora
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 128
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-eval is not installed (pip install lm-eval)")
ADAPTER = dict(method="teamlora", rank=2, experts=3, alpha=32.0, dropout=0.0, targets=["w1", "w2", "w3"])


def routed_model(vocab_size):
    """A tiny random base with TeamLoRA on its FFN, the adapters' B matrices made non-zero."""
    torch.manual_seed(0)
    model = Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=vocab_size, hidden_dim=48,
                                  max_seq_len=SEQ_LEN))
    teamlora.add_adapters(model, **ADAPTER)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith(teamlora.PREFIX):
                p.normal_(0, 0.5)
    return model.eval()


def requests(task, args, request_type):
    from lm_eval.api.instance import Instance
    return [Instance(request_type, {}, a, i, (task, i, 1)) for i, a in enumerate(args)]


def choice_examples(test, tok, n=3):
    """The first n examples of two tasks that fit SEQ_LEN uncut (the project's scorer would shorten
    their input, the harness their context's start)."""
    return [ex for task in ("nli", "sentiment")
            for ex in [e for e in test if e.task == task and not data.encode_example(tok, e, SEQ_LEN)[2]][:n]]


@needs_lm_eval
def test_loglikelihood_is_the_project_choice_score_less_eos(sp_tokenizer, builtin_mixture):
    import harness
    tok, model = sp_tokenizer, routed_model(sp_tokenizer.n_words)
    exs = choice_examples(builtin_mixture[1], sp_tokenizer)
    project = ev.choice_scores(model, tok, exs, SEQ_LEN)  # answer tokens + EOS, per choice
    pairs = [(data.prompt_text(ex), c) for ex in exs for c in ex.choices]
    lm = harness.ProjectLM(model, tok, batch_size=4)  # rows batched in several lengths
    got = lm.loglikelihood(requests("t", pairs, "loglikelihood"))
    row = 0
    for ex, scores in zip(exs, project):
        for choice, score in zip(ex.choices, scores):
            x, y, _ = data.encode_example(tok, ex, SEQ_LEN, answer=choice)  # bos + prompt + answer -> eos
            logits = model(torch.tensor([x]))[0].log_softmax(-1)  # (T, vocab)
            eos = logits[-1, tok.eos_id].item()
            assert got[row][0] == pytest.approx(score - eos, abs=1e-4)
            # greedy: every answer token is the argmax where it is predicted
            n = sum(t != data.IGNORE for t in y) - 1
            assert got[row][1] == all(logits[len(x) - 1 - n + j].argmax().item() == y[len(y) - 1 - n + j]
                                      for j in range(n))
            row += 1


@needs_lm_eval
def test_split_scores_the_token_that_spans_the_context_end(sp_tokenizer):
    import harness
    lm = harness.ProjectLM(routed_model(sp_tokenizer.n_words), sp_tokenizer)
    ctx, cont = lm._split("the cat", " sat")
    assert sp_tokenizer.decode(ctx + cont) == "the cat sat" and cont
    # a context ending in a space: the space's token does not survive the join, the word's does
    whole = sp_tokenizer.encode("the cat sat", bos=False, eos=False)
    ctx, cont = lm._split("the cat ", "sat")
    assert ctx + cont == whole and sp_tokenizer.decode(cont).strip() == "sat"


@needs_lm_eval
def test_rolling_loglikelihood_sums_the_windows(sp_tokenizer):
    import harness
    tok, model = sp_tokenizer, routed_model(sp_tokenizer.n_words)
    text = "Does the premise entail the hypothesis? " * 6
    ids = [tok.bos_id] + tok.encode(text, bos=False, eos=False)
    whole = -model(torch.tensor([ids[:-1]]), torch.tensor([ids[1:]]), reduction="none").sum().item()
    (one,) = harness.ProjectLM(model, tok).loglikelihood_rolling(requests("t", [(text,)], "loglikelihood_rolling"))
    assert one == pytest.approx(whole, abs=1e-3)
    # windows of 16 tokens: every token still predicted once, with less context
    (windowed,) = harness.ProjectLM(model, tok, max_length=16).loglikelihood_rolling(
        requests("t", [(text,)], "loglikelihood_rolling"))
    assert len(ids) > 40 and windowed != pytest.approx(whole, abs=1e-3) and windowed < 0


@needs_lm_eval
def test_generation_stops_at_its_stop_sequence(sp_tokenizer, builtin_mixture):
    import harness
    tok, model = sp_tokenizer, routed_model(sp_tokenizer.n_words)
    prompts = [data.prompt_text(ex) for ex in choice_examples(builtin_mixture[1], sp_tokenizer, 2)]
    free = [tok.decode(ids) for ids in model.generate([tok.encode(p, bos=True, eos=False) for p in prompts], 12,
                                                      eos_id=tok.eos_id)]
    assert free[0].strip(), "the random model generated nothing to stop in"
    stop = free[0].strip()[len(free[0].strip()) // 2:][:2]  # a piece of the first answer, from its middle
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    try:
        got = harness.ProjectLM(model, tok, batch_size=4).generate_until(
            requests("t", [(p, {"until": [stop], "max_gen_toks": 12}) for p in prompts], "generate_until"))
    finally:
        hook.remove()
    assert got == [f.split(stop)[0] for f in free]  # cut before the stop, as the model's own decoding goes
    assert got[0] != free[0]
    # one batch, stopped early: fewer forwards than 1 prefill + 12 steps, when every row stopped
    ended = [stop in f or len(tok.encode(f, bos=False, eos=False)) < 12 for f in free]
    if all(ended):
        assert len(forwards) < 12
    got = harness.ProjectLM(model, tok).generate_until(requests("t", [(prompts[0], {"max_gen_toks": 3})],
                                                                "generate_until"))
    assert got == [tok.decode(model.generate([tok.encode(prompts[0], bos=True, eos=False)], 3,
                                             eos_id=tok.eos_id)[0])]


@pytest.fixture(scope="module")
def harness_run(tmp_path_factory, sp_tokenizer, builtin_mixture):
    """A TeamLoRA run directory over a tiny base, and a folder of two lm-eval YAML tasks over local
    JSON files: t_mc (multiple choice, this project's prompt, empty target delimiter) and t_gen
    (generation with a stop sequence; its targets are what the model writes, cut there)."""
    import harness
    tmp = tmp_path_factory.mktemp("harness")
    base, run, tasks = tmp / "base", tmp / "run", tmp / "tasks"
    for d in (base, run, tasks):
        d.mkdir()
    tok, model = sp_tokenizer, routed_model(sp_tokenizer.n_words)
    (base / "tokenizer.model").write_bytes(tok.path.read_bytes())
    bare = Transformer(model.args)
    bare.load_state_dict({k: v for k, v in model.state_dict().items() if teamlora.PREFIX not in k}, strict=False)
    bare.save_pretrained(base)
    config = {"method": "teamlora", "seq_len": SEQ_LEN, "base": str(base), "data": None}
    common.save_checkpoint(run, teamlora.adapter_state_dict(model),
                           {"config": config, "adapter": ADAPTER, "base_path": str(base), "step": 1})
    exs = choice_examples(builtin_mixture[1], sp_tokenizer)
    (tasks / "mc.json").write_text(json.dumps(
        [{"prompt": data.prompt_text(ex), "choices": ex.choices, "gold": ex.choices.index(ex.output)} for ex in exs]))
    prompts = [data.prompt_text(ex) for ex in exs[:4]]
    free = [tok.decode(ids) for ids in model.generate([tok.encode(p, bos=True, eos=False) for p in prompts], 8,
                                                      eos_id=tok.eos_id)]
    stop = free[0].strip()[len(free[0].strip()) // 2:][:2]
    (tasks / "gen.json").write_text(json.dumps([{"prompt": p, "target": f.split(stop)[0]}
                                                for p, f in zip(prompts, free)]))
    common_yaml = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n" \
                  'doc_to_text: "{{{{prompt}}}}"\nmetadata:\n  version: 2.0\n'
    (tasks / "t_mc.yaml").write_text("task: t_mc\n" + common_yaml.format(tasks / "mc.json") +
                                     'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\n'
                                     'doc_to_target: "{{gold}}"\ntarget_delimiter: ""\n'
                                     "metric_list:\n  - metric: acc\n    aggregation: mean\n"
                                     "    higher_is_better: true\n")
    (tasks / "t_gen.yaml").write_text("task: t_gen\n" + common_yaml.format(tasks / "gen.json") +
                                      'output_type: generate_until\ndoc_to_target: "{{target}}"\n'
                                      f"generation_kwargs:\n  until: [{json.dumps(stop)}]\n  max_gen_toks: 8\n"
                                      "metric_list:\n  - metric: exact_match\n    aggregation: mean\n"
                                      "    higher_is_better: true\n")
    # what lm-eval's acc must be: this project's choice scores less the EOS term pick the answer
    scores = ev.choice_scores(model, tok, exs, SEQ_LEN)
    eos = [[model(torch.tensor([data.encode_example(tok, ex, SEQ_LEN, answer=c)[0]]))[0, -1].log_softmax(-1)
            [tok.eos_id].item() for c in ex.choices] for ex in exs]
    acc = sum(max(range(len(s)), key=lambda j: s[j] - e[j]) == ex.choices.index(ex.output)
              for ex, s, e in zip(exs, scores, eos)) / len(exs)
    # the tokens routing counts for t_mc: bos + context once, then each choice but its last token
    split = [[harness.ProjectLM(model, tok)._split(data.prompt_text(ex), c) for c in ex.choices] for ex in exs]
    tokens = sum(1 + len(s[0][0]) + sum(len(cont) - 1 for _, cont in s) for s in split)
    return run, tasks, acc, tokens


@needs_lm_eval
def test_eval_harness_one_process_then_two_gloo_ranks(harness_run, capsys):
    run, tasks, acc, tokens = harness_run
    ev.main(["--ckpt", str(run), "--harness", "t_mc,t_gen", "--harness-include", str(tasks), "--batch-size", "4"])
    printed = capsys.readouterr().out
    one = json.loads((run / "harness.json").read_text())
    assert one["results"]["t_mc"]["acc,none"] == pytest.approx(acc)
    assert one["results"]["t_gen"]["exact_match,none"] == 1.0  # the stop sequence honoured, through lm-eval
    assert "acc_stderr,none" in one["results"]["t_mc"] and one["versions"]["t_mc"] == 2.0
    assert one["config"]["method"] == "teamlora" and one["n-samples"]["t_mc"]["effective"] == 6
    assert "|t_mc " in printed and "|acc " in printed and "routing" in printed
    assert set(one["routing"]) == {"t_mc", "t_gen"} and one["routing"]["t_mc"]["tokens"] > 0
    assert one["routing"]["t_mc"]["tokens"] == tokens  # each context once, then each choice's inputs
    # lm-eval's own sharding over two ranks, CUDA's placement rules checked (tests/placement.py)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "tests/placement.py", "eval.py", "--ckpt", str(run), "--harness", "t_mc,t_gen",
           "--harness-include", str(tasks), "--batch-size", "4"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("|t_mc ") == 1  # rank 0 prints
    two = json.loads((run / "harness.json").read_text())
    for task in ("t_mc", "t_gen"):
        assert two["results"][task] == pytest.approx(one["results"][task])
        assert two["routing"][task]["tokens"] == one["routing"][task]["tokens"]
        assert two["routing"][task]["mean"] == pytest.approx(one["routing"][task]["mean"], abs=1e-5)


@needs_lm_eval
def test_base_alone_and_bad_task_names(harness_run, capsys):
    run, tasks, _, _ = harness_run
    base_dir = common.read_checkpoint(run)["base_path"]
    ev.main(["--base", base_dir, "--harness", "t_mc", "--harness-include", str(tasks), "--limit", "2"])
    printed = capsys.readouterr().out
    assert "|t_mc " in printed and "routing" not in printed  # no adapters, no routing
    with pytest.raises(common.UserError, match="lm-eval has no task 'no_such_task'"):
        ev.main(["--base", base_dir, "--harness", "no_such_task", "--harness-include", str(tasks)])


def test_missing_lm_eval_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "harness", None)  # `import harness` now raises ImportError
    with pytest.raises(common.UserError, match="pip install lm-eval"):
        ev.main(["--base", str(tmp_path), "--harness", "boolq"])
    for argv in (["--harness", "boolq"],  # neither --ckpt nor --base: usage errors
                 ["--compare", str(tmp_path), "--harness", "boolq"], ["--ckpt", str(tmp_path), "--num-fewshot", "5"]):
        with pytest.raises(SystemExit):
            ev.main(argv)
