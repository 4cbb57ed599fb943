"""train.py end to end on a tiny random base: DDP equals one process, resume equals no interruption,
checkpoints load back for evaluation, collectives get device tensors, user errors are one line,
and what a new user trips over (issue 15): cheap checks before the weights load, a second run
into one OUT, predictions, the majority baseline, the logged lr, a moved base."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import common
import data
import eval as evaluation
import model as model_py
import report
import runs
import teamlora
import train
from model import ModelArgs, Transformer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "red green blue cat dog bird one two three tree river stone wind fire rain".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny random base (with its tokenizer) and a two-task mixture, written like a user's."""
    tmp = tmp_path_factory.mktemp("train")
    rng = random.Random(0)
    mix = tmp / "mix"
    mix.mkdir()
    for split, n in (("train", 48), ("test", 8)):
        with open(mix / f"{split}.jsonl", "w") as f:
            for i in range(n):
                words = rng.sample(WORDS, 4)
                f.write(json.dumps({"task": "color", "instruction": "Is a color first?", "input": " ".join(words),
                                    "output": "yes" if words[0] in ("red", "green", "blue") else "no",
                                    "choices": ["yes", "no"]}) + "\n")
                f.write(json.dumps({"task": "copy", "instruction": "Repeat the last word.", "input": " ".join(words),
                                    "output": words[-1]}) + "\n")
    base = tmp / "base"
    base.mkdir()
    texts = [" ".join(rng.sample(WORDS, 6)) for _ in range(400)] + ["Is a color first? Repeat the last word. yes no"]
    data.train_tokenizer(texts, base / "tokenizer", vocab_size=400)
    tok = load_tokenizer(base)
    torch.manual_seed(0)
    Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=tok.n_words, hidden_dim=48,
                          max_seq_len=128)).save_pretrained(base)
    return base, mix


def flags(setup, out, *extra):
    base, mix = setup
    return ["--base", str(base), "--data", str(mix), "--out", str(out), "--method", "teamlora", "--rank", "2",
            "--experts", "2", "--seq-len", "64", "--lr", "1e-2", "--warmup", "0.2", "--eval-limit", "4", *extra]


def run(args, nproc=None, placement=False, returncode=0):
    """train.py in a subprocess (under torchrun with nproc; through tests/placement.py with placement)."""
    cmd = [sys.executable, *(["tests/placement.py"] if placement else []), "train.py", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *cmd[1:]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == returncode, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def adapters(out):
    return load_file(Path(out) / "adapters.safetensors")


def log(out):
    return [json.loads(line) for line in open(Path(out) / "log.jsonl")]


def test_two_gloo_ranks_equal_one_process_on_the_same_global_batch(setup, tmp_path):
    common = ["--max-steps", "3", "--dropout", "0", "--no-eval", "--grad-accum", "2"]
    run(flags(setup, tmp_path / "one", "--batch-size", "4", *common))
    run(flags(setup, tmp_path / "two", "--batch-size", "2", *common), nproc=2)
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    # Equal gradient norms each step (a loss-normalisation error would scale them), then equal weights.
    for a, b in zip(one, two, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


class Crash(Exception):
    pass


def test_killed_and_resumed_run_ends_with_the_same_weights(setup, tmp_path, monkeypatch):
    args = ["--max-steps", "6", "--save-every", "3", "--batch-size", "3", "--dropout", "0.1", "--no-eval"]
    train.main(flags(setup, tmp_path / "whole", *args))
    save = runs.save

    def save_then_die(*a, **k):
        save(*a, **k)
        raise Crash  # the process dies right after its step-3 checkpoint

    monkeypatch.setattr(runs, "save", save_then_die)
    with pytest.raises(Crash):
        train.main(flags(setup, tmp_path / "cut", *args))
    monkeypatch.setattr(runs, "save", save)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    train.main(flags(setup, tmp_path / "cut", *args, "--resume"))
    whole, cut = adapters(tmp_path / "whole"), adapters(tmp_path / "cut")
    assert whole.keys() == cut.keys()
    for k in whole:
        assert torch.equal(whole[k], cut[k]), k
    assert [r["step"] for r in log(tmp_path / "cut")] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log(tmp_path / "cut")] == [r["loss"] for r in log(tmp_path / "whole")]


def test_crash_while_writing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    common.atomic_save({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(common.WriteFailed, match="disk full"):
        common.atomic_save({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}


def test_checkpoint_loads_back_for_evaluation(setup, tmp_path):
    out = tmp_path / "run"
    res = run(flags(setup, out, "--max-steps", "4", "--batch-size", "4"))
    assert "average" in res.stdout.lower()
    results = json.loads((out / "eval.json").read_text())
    assert set(results["tasks"]) == {"color", "copy"}
    model, tok, config = common.load_run(out)
    assert config["method"] == "teamlora"
    for k, v in adapters(out).items():
        assert torch.equal(teamlora.adapter_state_dict(model)[k], v)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["trainable"] > 0
    again = evaluation.evaluate(model, tok, data.load_mixture(setup[1])[1], 64, limit=4)
    assert again["average"] == pytest.approx(results["average"])


def summary(out):
    return json.loads((Path(out) / "summary.json").read_text())


def test_killed_run_resumes_with_its_token_count(setup, tmp_path, monkeypatch):
    """tokens/s after a resume: the token count is saved and restored with the time (it restarted at 0)."""
    args = ["--max-steps", "4", "--save-every", "2", "--batch-size", "3", "--no-eval"]
    train.main(flags(setup, tmp_path / "whole", *args))
    save = runs.save

    def save_then_die(*a, **k):
        save(*a, **k)
        raise Crash

    monkeypatch.setattr(runs, "save", save_then_die)
    with pytest.raises(Crash):
        train.main(flags(setup, tmp_path / "cut", *args))
    monkeypatch.setattr(runs, "save", save)
    train.main(flags(setup, tmp_path / "cut", *args, "--resume"))
    whole, cut = summary(tmp_path / "whole"), summary(tmp_path / "cut")
    assert cut["tokens"] == whole["tokens"] > 0
    assert cut["tokens_per_s"] * cut["train_time_s"] == pytest.approx(whole["tokens_per_s"] * whole["train_time_s"])


# ----------------------------------------------------------------------------- issue 11


def test_every_tensor_handed_to_a_collective_is_on_the_training_device(setup, tmp_path):
    """--method lora under two gloo ranks, with CUDA's placement rules checked on the CPU
    (tests/placement.py says how and why that way): LoRA's aux term is a torch.zeros(()) made on
    the CPU, and an all_reduce of it is what kills a multi-GPU LoRA run at step 1."""
    out = tmp_path / "lora"
    run(flags(setup, out, "--method", "lora", "--max-steps", "2", "--batch-size", "2", "--grad-accum", "2",
              "--save-every", "1", "--eval-limit", "2"), nproc=2, placement=True)
    assert [r["step"] for r in log(out)] == [1, 2] and (out / "eval.json").exists()


def test_balance_term_covers_every_real_token_and_trains(setup, tmp_path, monkeypatch):
    """The balance term's mask is every non-padding token, told by length: pad_id is eos_id here
    (as for LLaMA), so neither `targets != IGNORE` (answers only) nor `tokens != pad_id` (drops
    each answer's EOS) is it."""
    tok = load_tokenizer(setup[0])
    assert tok.pad_id == tok.eos_id
    seen, aux_loss = [], teamlora.adapter_aux_loss

    def recording(model, mask=None):
        seen.append(mask.cpu())
        return aux_loss(model, mask)

    monkeypatch.setattr(teamlora, "adapter_aux_loss", recording)
    stream = []
    collate = data.collate
    monkeypatch.setattr(data, "collate", lambda items, pad_id: stream.append(items) or collate(items, pad_id))
    train.main(flags(setup, tmp_path / "bal", "--max-steps", "2", "--batch-size", "4", "--balance", "1.0",
                     "--no-eval"))
    for mask, items in zip(seen, stream):
        lengths = torch.tensor([len(x) for x, _, _ in items])
        assert torch.equal(mask.sum(1), lengths)  # every real token, prompt and EOS included
        assert torch.equal(mask, torch.arange(mask.shape[1]) < lengths[:, None])
    assert len(seen) == len(stream) == 2  # one micro-batch per step
    assert all(r["aux"] > 0 for r in log(tmp_path / "bal"))
    monkeypatch.undo()
    train.main(flags(setup, tmp_path / "none", "--max-steps", "2", "--batch-size", "4", "--no-eval"))
    with_balance, without = adapters(tmp_path / "bal"), adapters(tmp_path / "none")
    assert any(not torch.equal(with_balance[k], without[k]) for k in with_balance if "router" in k)


def test_save_every_0_saves_only_at_the_end(setup, tmp_path, monkeypatch):
    steps = []
    monkeypatch.setattr(common, "save_checkpoint", lambda out, tensors, state: steps.append(state["step"]),
                        raising=False)  # raising=False: before the fix, the run died of a division by zero
    train.main(flags(setup, tmp_path / "run", "--max-steps", "3", "--batch-size", "2", "--save-every", "0",
                     "--no-eval"))
    assert steps == [3]


def test_resuming_a_finished_run_trains_nothing_and_evaluates(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(flags(setup, out, "--max-steps", "2", "--batch-size", "2", "--no-eval"))
    before = adapters(out)
    train.main(flags(setup, out, "--max-steps", "2", "--batch-size", "2", "--resume"))  # evaluation may differ
    assert "finished" in capsys.readouterr().out
    assert [r["step"] for r in log(out)] == [1, 2]
    after = adapters(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert summary(out)["final_loss"] == log(out)[-1]["loss"]
    assert set(json.loads((out / "eval.json").read_text())["tasks"]) == {"color", "copy"}


def test_resume_with_other_flags_is_refused_naming_them(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(flags(setup, out, "--max-steps", "2", "--batch-size", "2", "--no-eval"))
    capsys.readouterr()  # the run's own output
    for change, named in ((["--rank", "4", "--seed", "1"], ("--rank 2 (now 4)", "--seed 0 (now 1)")),
                          (["--temperature", "2", "--task-cap", "5"], ("--temperature", "--task-cap")),
                          (["--batch-size", "3", "--seq-len", "32"], ("--batch-size", "--seq-len")),
                          (["--method", "lora", "--targets", "w1", "--alpha", "8"], ("--method", "--targets", "--alpha")),
                          (["--experts", "3", "--router", "softmax"], ("--experts", "--router")),
                          (["--data", str(setup[1] / "train.jsonl")], ("--data",))):
        with pytest.raises(SystemExit) as e:
            common.cli(train.main, flags(setup, out, "--max-steps", "2", "--batch-size", "2", "--resume", *change))
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: --resume:"), err
        for flag in named:
            assert flag in err, (flag, err)
    # How a run is carried out may change: it continues (here: it is finished, so it evaluates).
    train.main(flags(setup, out, "--max-steps", "2", "--batch-size", "2", "--resume", "--save-every", "7",
                     "--eval-limit", "1"))


def broken_mixture(tmp_path):
    mix = tmp_path / "broken"
    mix.mkdir()
    good = json.dumps({"task": "copy", "instruction": "Repeat the last word.", "input": "red cat", "output": "cat"})
    (mix / "train.jsonl").write_text(f"{good}\n{good}\n{good[:-5]}\n{good}\n")  # line 3 is cut short
    (mix / "test.jsonl").write_text(f"{good}\n")
    return mix


def test_a_broken_mixture_is_one_line_naming_file_and_line(setup, tmp_path):
    mix = broken_mixture(tmp_path)
    res = run(flags((setup[0], mix), tmp_path / "run", "--max-steps", "1"), returncode=2)
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().count("\n") == 0 and f"{mix / 'train.jsonl'}:3" in res.stderr, res.stderr


@pytest.mark.parametrize("case", ["resume without checkpoint", "bad flag", "missing base", "bad targets",
                                  "unusable checkpoint"])
def test_user_errors_are_one_line_and_exit_2(setup, tmp_path, capsys, case):
    out = tmp_path / "run"
    argv = {"resume without checkpoint": ["--resume"], "bad flag": ["--rank", "0"],
            "missing base": ["--base", str(tmp_path / "nowhere")], "bad targets": ["--targets", "wq_typo"],
            "unusable checkpoint": ["--resume"]}[case]
    if case == "unusable checkpoint":
        out.mkdir()
        (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(SystemExit) as e:
        common.cli(train.main, flags(setup, out, "--max-steps", "1", *argv))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") or "error:" in err.splitlines()[-1], err  # argparse also prints its usage
    assert "Traceback" not in err


def test_a_bug_keeps_its_traceback():
    def main(argv):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        common.cli(main, [])


def test_a_crash_between_the_two_renames_leaves_a_loadable_pair(tmp_path, monkeypatch):
    """save_checkpoint writes both files before renaming either; dying after the first rename
    leaves new adapters and the old checkpoint.pt, and read_checkpoint takes the new one from .tmp."""
    state = lambda step: {"step": step, "adapter": {"method": "lora"}, "config": {}}  # noqa: E731
    common.save_checkpoint(tmp_path, {"lora_A": torch.zeros(2)}, state(1))
    replace, calls = os.replace, []

    def die_on_second(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError("killed")
        replace(a, b)

    monkeypatch.setattr(common.os, "replace", die_on_second)
    with pytest.raises(common.WriteFailed):
        common.save_checkpoint(tmp_path, {"lora_A": torch.ones(2)}, state(2))
    monkeypatch.undo()
    ckpt = common.read_checkpoint(tmp_path)
    assert ckpt["step"] == 2 and torch.equal(ckpt["tensors"]["lora_A"], torch.ones(2))
    (tmp_path / "checkpoint.pt.tmp").unlink()  # without it the pair is refused, not silently mixed
    with pytest.raises(common.CheckpointError, match="step 2.*step 1"):
        common.read_checkpoint(tmp_path)


def test_full_fine_tuning_checkpoint_is_safetensors_and_loads(setup, tmp_path):
    out = tmp_path / "full"
    train.main(flags(setup, out, "--method", "full", "--max-steps", "1", "--batch-size", "2", "--no-eval"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["adapter"] is None and "tensors" not in ckpt
    model, _, config = common.load_run(out)
    assert config["method"] == "full"
    state = model.state_dict()
    for k, v in load_file(out / "adapters.safetensors").items():
        assert torch.equal(state[k], v), k


def test_checkpoint_format_and_adapter_config_rebuilds(setup, tmp_path):
    out = tmp_path / "run"
    train.main(flags(setup, out, "--max-steps", "1", "--batch-size", "2", "--no-eval", "--method", "moelora"))
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"config", "adapter", "base_path", "data_path", "step", "train_time", "tokens", "loss",
                         "skipped", "optimizer", "scheduler", "rng", "data"}
    assert ckpt["data"] == {"epoch": 0, "offset": 2, "examples_seen": 2} and ckpt["skipped"] == 0
    assert ckpt["config"] == vars(train.get_args(flags(setup, out, "--max-steps", "1", "--batch-size", "2",
                                                       "--no-eval", "--method", "moelora")))
    assert ckpt["adapter"] == {"method": "moelora", "rank": 2, "experts": 2, "alpha": 32.0, "dropout": 0.05,
                               "targets": ["w1", "w2", "w3"], "router": "softmax"}  # as used, in model.py's names
    model = Transformer.from_pretrained(setup[0])
    teamlora.add_adapters(model, **ckpt["adapter"])
    teamlora.load_adapter_state_dict(model, load_file(out / "adapters.safetensors"))


def test_presets_show_in_help_and_follow_the_base(capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tiny 0.002 / cpu 0.001 / paper 0.0002" in text and "tiny 16 / cpu 8 / paper 4" in text
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in text
    assert train.get_args(["--base", "tiny"]).preset == "tiny"
    assert train.get_args(["--base", "x", "--device", "cpu"]).preset == "cpu"
    args = train.get_args(["--base", "x", "--device", "cpu", "--lr", "3e-3"])
    assert (args.lr, args.max_steps, args.batch_size, args.eval_limit) == (3e-3, 300, 8, 100)


# ----------------------------------------------------------------------------- issue 15: a new user's first hour


@pytest.fixture(scope="module")
def hf_base(setup, tmp_path_factory):
    """A base laid out like a current Hugging Face checkpoint: config.json, safetensors and only a
    byte-level BPE tokenizer.json (as SmolLM2 ships), trained here with the tokenizers package."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    from test_model import write_hf
    base = tmp_path_factory.mktemp("hf") / "base"
    base.mkdir()
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    mixture = data.load_mixture(setup[1])
    hf.train_from_iterator([data.prompt_text(ex) + ex.output for ex in mixture[0] + mixture[1]], trainer)
    hf.save(str(base / "tokenizer.json"))
    torch.manual_seed(0)
    write_hf(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=hf.get_vocab_size(),
                                   hidden_dim=48, max_seq_len=128)), base)
    assert sorted(f.name for f in base.iterdir() if f.name.startswith("tok")) == ["tokenizer.json"]
    return base


def no_weights(monkeypatch):
    """From here on, reading any base weight fails the test (model._read reads every checkpoint file)."""
    monkeypatch.setattr(model_py, "_read", lambda file: pytest.fail(f"weights read: {file}"))


def test_a_checkpoint_with_only_tokenizer_json_trains_evaluates_and_generates(hf_base, setup, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(flags((hf_base, setup[1]), out, "--max-steps", "2", "--batch-size", "2"))
    assert set(json.loads((out / "eval.json").read_text())["tasks"]) == {"color", "copy"}
    evaluation.main(["--ckpt", str(out), "--limit", "2", "--max-new-tokens", "2"])
    model_py.main([str(hf_base), "--prompt", "red cat", "--max-new-tokens", "3"])
    evaluation.main(["--ckpt", str(out), "--prompt", "red cat", "--max-new-tokens", "3"])  # with its adapters
    assert capsys.readouterr().out.count("red cat") == 2


@pytest.mark.parametrize("broken", ["tokenizer", "no tokenizer", "config", "no config", "no weights"])
def test_a_broken_base_is_reported_before_any_weight_is_read(hf_base, setup, tmp_path, monkeypatch, capsys, broken):
    """train.py, eval.py --base and model.py's CLI check the tokenizer and config.json first: a 7B base
    takes minutes to load, and a bad tokenizer.json should not wait for it."""
    out = tmp_path / "run"
    train.main(flags((hf_base, setup[1]), out, "--max-steps", "1", "--batch-size", "2", "--no-eval"))
    base = tmp_path / "broken"
    base.mkdir()
    for f in hf_base.iterdir():
        (base / f.name).write_bytes(f.read_bytes())
    config = json.loads((base / "config.json").read_text())
    if broken == "tokenizer":
        (base / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab"')  # cut short
    elif broken == "config":
        (base / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    else:
        for f in {"no tokenizer": ["tokenizer.json"], "no config": ["config.json"],
                  "no weights": [f.name for f in base.glob("model*")]}[broken]:
            (base / f).unlink()
    named = {"tokenizer": "tokenizer.json", "no tokenizer": "no tokenizer", "config": "model_type='gpt2'",
             "no config": "config.json", "no weights": "no weights"}[broken]
    no_weights(monkeypatch)
    capsys.readouterr()
    for main, argv in ((train.main, flags((base, setup[1]), tmp_path / "again", "--max-steps", "1")),
                       (evaluation.main, ["--ckpt", str(out), "--base", str(base)]),
                       (model_py.main, [str(base)])):
        with pytest.raises(SystemExit) as e:
            common.cli(main, argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and named in err, (main.__module__, err)


def test_data_and_flags_are_checked_before_the_weights_load(hf_base, setup, tmp_path, monkeypatch, capsys):
    """A bad data line, and --targets that name no layer (tried on a model without storage)."""
    mix = broken_mixture(tmp_path)
    no_weights(monkeypatch)
    for mixture, argv, named in ((mix, [], f"{mix / 'train.jsonl'}:3"),
                                 (setup[1], ["--targets", "wq_typo"], "wq_typo: not a linear layer")):
        with pytest.raises(SystemExit):
            common.cli(train.main, flags((hf_base, mixture), tmp_path / "run", *argv))
        assert named in capsys.readouterr().err


def test_a_second_run_into_the_same_out_needs_resume_or_overwrite(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(flags(setup, out, "--max-steps", "2", "--batch-size", "2"))
    assert (out / "eval.json").exists() and (out / "predictions.jsonl").exists()
    first = adapters(out)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # refused before anything is loaded or written
        common.cli(train.main, flags(setup, out, "--max-steps", "1", "--batch-size", "2", "--seed", "1"))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "--resume" in err and "--overwrite" in err, err
    assert all(torch.equal(first[k], v) for k, v in adapters(out).items())
    (tmp_path / "started").mkdir()
    (tmp_path / "started" / "log.jsonl").write_text("")  # died before its first checkpoint: still a run
    with pytest.raises(SystemExit):
        common.cli(train.main, flags(setup, tmp_path / "started", "--max-steps", "1"))
    with pytest.raises(SystemExit):
        train.get_args(flags(setup, out, "--resume", "--overwrite"))
    train.main(flags(setup, out, "--max-steps", "1", "--batch-size", "2", "--seed", "1", "--overwrite", "--no-eval"))
    assert [r["step"] for r in log(out)] == [1] and summary(out)["config"]["seed"] == 1
    assert not (out / "eval.json").exists() and not (out / "predictions.jsonl").exists()  # not the old run's


def majority_mixture(tmp_path):
    """color: mostly "yes" in training (12 of 16), mostly "no" in the test split (6 of 8); copy: generated."""
    mix = tmp_path / "majority"
    mix.mkdir()
    for split, answers in (("train", ["yes"] * 12 + ["no"] * 4), ("test", ["yes"] * 2 + ["no"] * 6)):
        rows = [{"task": "color", "instruction": "Is a color first?", "input": f"{WORDS[i % 15]} cat", "output": a,
                 "choices": ["yes", "no"]} for i, a in enumerate(answers)]
        rows += [{"task": "copy", "instruction": "Repeat the last word.", "input": f"red {w}", "output": w}
                 for w in WORDS[:len(answers) // 2]]
        (mix / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return mix


def test_final_evaluation_majority_from_training_predictions_and_heatmap(setup, tmp_path, capsys):
    out = tmp_path / "run"
    train.main(flags((setup[0], majority_mixture(tmp_path)), out, "--max-steps", "1", "--batch-size", "2",
                     "--eval-limit", "0"))
    printed = capsys.readouterr().out
    results = json.loads((out / "eval.json").read_text())
    assert results["majority"]["tasks"] == {"color": 2 / 8, "copy": None}  # "yes" always: 2 of 8 test answers
    assert results["majority"]["answers"]["color"] == "yes"
    assert {t: s["n"] for t, s in results["tasks"].items()} == {"color": 8, "copy": 4}  # --eval-limit 0: all
    predicted = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert [p["task"] for p in predicted] == ["color"] * 8 + ["copy"] * 4
    assert [p["gold"] for p in predicted[:8]] == ["yes"] * 2 + ["no"] * 6
    assert all(p["predicted"] in ("yes", "no") and p["correct"] == (p["predicted"] == p["gold"]) for p in predicted[:8])
    assert all(0 <= p["score"] <= 1 for p in predicted[8:])  # ROUGE-L of the generated answer
    assert str(out / "routing.png") in printed or "matplotlib is not installed" in printed
    assert "load_entropy: the entropy of the task's mean shares" in printed


def test_eval_limit_0_means_all_and_a_single_jsonl_skips_evaluation(setup, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--help"])
    assert "0 = all" in " ".join(capsys.readouterr().out.split())
    single = setup[1] / "train.jsonl"
    out = tmp_path / "run"
    train.main(flags((setup[0], single), out, "--max-steps", "1", "--batch-size", "2", "--eval-limit", "0"))
    printed = capsys.readouterr().out
    assert f"no test split in {single}: evaluation skipped" in printed
    assert "average" not in printed and not (out / "eval.json").exists()
    with pytest.raises(SystemExit):  # eval.py has nothing to do: a one-line error
        common.cli(evaluation.main, ["--ckpt", str(out)])
    assert "no test split" in capsys.readouterr().err


def test_the_logged_lr_is_the_one_the_step_used(setup, tmp_path):
    train.main(flags(setup, tmp_path / "one", "--max-steps", "1", "--batch-size", "2", "--no-eval"))
    assert [r["lr"] for r in log(tmp_path / "one")] == [1e-2]  # no warm-up step at 0.2 of 1; not the next (0)
    train.main(flags(setup, tmp_path / "three", "--max-steps", "3", "--batch-size", "2", "--warmup", "0.5",
                     "--no-eval"))
    expected = [1e-2 * train.cosine_lr(s, 3, 1) for s in range(3)]
    assert [r["lr"] for r in log(tmp_path / "three")] == pytest.approx(expected) and expected == [1e-2, 1e-2, 5e-3]


def test_the_effective_batch_is_printed_at_start(setup, tmp_path, capsys):
    train.main(flags(setup, tmp_path / "run", "--preset", "paper", "--batch-size", "2", "--max-steps", "1",
                     "--no-eval"))
    assert "global batch: 1 process x 2 examples x 8 micro-steps = 16 examples per step" in capsys.readouterr().out


def test_summary_holds_the_router_used_and_compare_shows_it(setup, tmp_path):
    out = tmp_path / "run"
    train.main(flags(setup, out, "--max-steps", "1", "--batch-size", "2", "--eval-limit", "1"))
    assert summary(out)["config"]["router"] is None and summary(out)["adapter"]["router"] == "shapley"
    assert "shapley" in report.compare([out]).splitlines()[1].split()


def test_the_base_is_stored_as_given_and_found_after_a_move(setup, tmp_path, monkeypatch, capsys):
    """A relative --base stays relative in the config, next to its absolute path: moving the whole
    project (base and runs) keeps the run loadable from the new place; a base that is gone names --base."""
    project = tmp_path / "project"
    (project / "bases" / "tiny").mkdir(parents=True)
    for f in setup[0].iterdir():
        (project / "bases" / "tiny" / f.name).write_bytes(f.read_bytes())
    monkeypatch.chdir(project)
    train.main(flags((Path("bases/tiny"), setup[1]), "runs/a", "--max-steps", "1", "--batch-size", "2",
                     "--no-eval"))
    ckpt = torch.load(project / "runs/a/checkpoint.pt", weights_only=True)
    assert ckpt["config"]["base"] == "bases/tiny" and ckpt["base_path"] == str(project / "bases/tiny")
    moved = tmp_path / "moved"
    project.rename(moved)
    monkeypatch.chdir(moved)
    evaluation.main(["--ckpt", "runs/a", "--limit", "1", "--max-new-tokens", "1"])  # bases/tiny, from here
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        common.cli(evaluation.main, ["--ckpt", "moved/runs/a", "--limit", "1"])
    assert "say where it is now with --base" in capsys.readouterr().err
    evaluation.main(["--ckpt", "moved/runs/a", "--base", "moved/bases/tiny", "--limit", "1", "--max-new-tokens", "1"])


# ---- issue 19: FSDP2, the final evaluation as eval.py's, the resume dict freed, --balance 0 ----


def test_fsdp_two_gloo_ranks_equal_one_process_and_resume_bit_exact(setup, tmp_path):
    """--fsdp on 2 gloo ranks: the losses, gradient norms and adapters of one process on the same
    global batch; killed after its step-2 checkpoint and resumed, it ends bit-exact as the whole run."""
    common_ = ["--max-steps", "3", "--dropout", "0", "--no-eval", "--grad-accum", "2", "--save-every", "2"]
    run(flags(setup, tmp_path / "one", "--batch-size", "4", *common_))
    run(flags(setup, tmp_path / "two", "--batch-size", "2", "--fsdp", *common_), nproc=2)
    one, two = log(tmp_path / "one"), log(tmp_path / "two")
    for a, b in zip(one, two, strict=True):
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
    a, b = adapters(tmp_path / "one"), adapters(tmp_path / "two")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    # Killed right after its step-2 checkpoint (the project's format, full tensors), resumed under FSDP.
    cut = tmp_path / "cut"
    die = tmp_path / "die_after_step_2.py"
    die.write_text(f"import sys; sys.path.insert(0, {str(ROOT)!r}); import common, runs, train\n"
                   "save = runs.save\n"
                   "def save_then_die(*a, **k):\n"
                   "    save(*a, **k)\n"
                   "    if a[5]['step'] == 2: raise SystemExit(3)\n"
                   "runs.save = save_then_die\n"
                   "common.cli(train.main)\n")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(die),
           *flags(setup, cut, "--batch-size", "2", "--fsdp", *common_)]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=240)
    assert res.returncode != 0 and [r["step"] for r in log(cut)] == [1, 2], res.stderr[-3000:]
    ckpt = torch.load(cut / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 2 and all(type(v) is torch.Tensor for s in ckpt["optimizer"]["state"].values()
                                     for v in s.values())
    run(flags(setup, cut, "--batch-size", "2", "--fsdp", *common_, "--resume"), nproc=2)
    whole, resumed = adapters(tmp_path / "two"), adapters(cut)
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert [r["loss"] for r in log(cut)] == [r["loss"] for r in log(tmp_path / "two")]


@pytest.mark.parametrize("method", ["lora", "teamlora", "full"])
def test_final_evaluation_is_eval_py_s_on_the_run_it_saved(setup, tmp_path, monkeypatch, method):
    """train.py's eval.json equals `eval.py --ckpt OUT`'s on every score (bf16 training on a CPU),
    and the training model is gone when the evaluation's model loads (no optimizer state beside it)."""
    import gc
    import weakref
    out, built, seen = tmp_path / method, [], []
    build, evaluate = train.build, evaluation.evaluate

    def recording_build(*a, **k):
        made = build(*a, **k)
        built.append(weakref.ref(made[2]))
        return made

    def checking_evaluate(*a, **k):
        gc.collect()
        seen.append(built[0]() is None)
        return evaluate(*a, **k)

    monkeypatch.setattr(train, "build", recording_build)
    monkeypatch.setattr(evaluation, "evaluate", checking_evaluate)
    train.main(flags(setup, out, "--method", method, "--dtype", "bfloat16", "--max-steps", "2", "--batch-size", "2"))
    assert seen == [True]
    trained = json.loads((out / "eval.json").read_text())
    evaluation.main(["--ckpt", str(out), "--limit", "4"])
    assert json.loads((out / "eval.json").read_text()) == trained


def test_the_resume_dict_is_freed_once_restored(setup, tmp_path, monkeypatch):
    """While a resumed run trains, the checkpoint dict it read (tensors, optimizer state) is gone."""
    import gc
    import weakref
    args = flags(setup, tmp_path / "run", "--max-steps", "3", "--save-every", "2", "--batch-size", "2", "--no-eval")
    save, read, record, refs, alive = runs.save, common.read_checkpoint, runs.record, [], []

    def save_then_die(*a, **k):
        save(*a, **k)
        raise Crash

    monkeypatch.setattr(runs, "save", save_then_die)
    with pytest.raises(Crash):
        train.main(args)
    monkeypatch.setattr(runs, "save", save)

    class Held(dict):  # a dict a weak reference can follow
        pass

    def reading(out):
        refs.append(weakref.ref(ckpt := Held(read(out))))
        return ckpt

    def checking(*a, **k):
        gc.collect()
        alive.append(refs[0]() is not None)
        return record(*a, **k)

    monkeypatch.setattr(common, "read_checkpoint", reading)
    monkeypatch.setattr(runs, "record", checking)
    train.main(args + ["--resume"])
    assert len(refs) == 1 and alive == [False]  # step 3 ran without it


def test_balance_0_never_computes_the_balance_term(setup, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("adapter_aux_loss called at --balance 0")

    monkeypatch.setattr(teamlora, "adapter_aux_loss", refuse)
    train.main(flags(setup, tmp_path / "run", "--max-steps", "2", "--batch-size", "2", "--no-eval"))
    assert [r["aux"] for r in log(tmp_path / "run")] == [0.0, 0.0]


def test_compile_pads_lengths_to_a_multiple_of_64_without_changing_the_loss():
    batch = data.collate([([5, 6, 7], [-100, 6, 7], 0), ([5, 6], [-100, 6], 1)], pad_id=0)
    padded = train.pad_length(batch, 64, 100, 0)
    assert padded["tokens"].shape == (2, 64) and padded["mask"].sum() == 5
    assert (padded["targets"][:, 3:] == data.IGNORE).all() and torch.equal(padded["tokens"][:, :3], batch["tokens"])
    assert train.pad_length(batch, 64, 40, 0)["tokens"].shape == (2, 40)  # never past the longest example
