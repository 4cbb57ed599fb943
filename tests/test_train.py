"""train.py end to end on a tiny random base: DDP equals one process, resume equals no interruption,
checkpoints load back for evaluation."""
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


def run(args, nproc=None):
    cmd = [sys.executable, "train.py", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
               str(29500 + os.getpid() % 1000), "train.py", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
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
    train.train(train.get_args(flags(setup, tmp_path / "whole", *args)))
    save = train.save

    def save_then_die(*a, **k):
        save(*a, **k)
        raise Crash  # the process dies right after its step-3 checkpoint

    monkeypatch.setattr(train, "save", save_then_die)
    with pytest.raises(Crash):
        train.train(train.get_args(flags(setup, tmp_path / "cut", *args)))
    monkeypatch.setattr(train, "save", save)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    train.train(train.get_args(flags(setup, tmp_path / "cut", *args, "--resume")))
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
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
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
