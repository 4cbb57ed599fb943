"""pretrain.py: the tiny base's text and batches, and its cache, keyed by what built it (on a
model and a text far smaller than the real tiny base's, so a build takes about a second).

    python -m pytest -q tests/test_pretrain.py
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import common
import model
import pretrain
from data import Example
from model import CheckpointNotFound, Transformer

ROOT = Path(__file__).resolve().parent.parent
WORDS = "red green blue cat dog bird one two three tree river stone wind fire rain".split()
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_pretraining_texts_and_lm_batches(sp_tokenizer):
    train = [Example("t", "Name it.", "a cat", "SECRET", None), Example("u", "Pick.", "", "b", ["a", "b"]),
             Example("u", "Pick again.", "x", "a", ["a", "b"])]
    texts = list(pretrain.pretraining_texts(train))
    assert texts[0] == "PRIDE AND PREJUDICE" and len(texts) > 10000  # the corpus first
    assert texts[-4:] == ["Name it.\na cat", "Pick.", "Pick again.\nx", "Answers: a, b"]
    assert not any("SECRET" in t for t in texts)

    tok = sp_tokenizer
    stream = pretrain.lm_stream(tok, ["one two", "three"])
    assert stream.tolist() == tok.encode("one two", True, True) + tok.encode("three", True, True)
    stream = torch.arange(100)
    x, y = pretrain.lm_batch(stream, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(y, x + 1)
    assert torch.equal(x, pretrain.lm_batch(stream, 4, 16, torch.Generator().manual_seed(0))[0])
    with pytest.raises(ValueError, match="seq_len"):
        pretrain.lm_batch(stream, 1, 100, torch.Generator())


@pytest.fixture
def small(monkeypatch, tmp_path):
    """The tiny base's recipe on a 1-layer model and 300 short sentences, cached under tmp_path;
    returns the list of texts (append to it to change what the base is built from)."""
    rng = random.Random(0)
    texts = [" ".join(rng.sample(WORDS, 6)) for _ in range(300)]
    monkeypatch.setattr(model, "TINY_BASE", tmp_path / "tiny-base")
    monkeypatch.setattr(pretrain, "TINY", dict(dim=32, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=320,
                                               hidden_dim=48, max_seq_len=160, tie_embeddings=True))
    monkeypatch.setattr(pretrain, "load_mixture", lambda path: ([], []))
    monkeypatch.setattr(pretrain, "pretraining_texts", lambda train: iter(texts))
    return texts


def weights(path):
    return torch.load(path / "consolidated.00.pth", weights_only=True)


def test_the_tiny_base_is_cached_per_step_count_and_built_again_when_its_text_changes(small, monkeypatch, tmp_path):
    one = pretrain.tiny_base(1)
    assert one == model.tiny_dir(1) == model.TINY_BASE / "1-steps"
    assert json.loads((one / "built_from.json").read_text())["steps"] == 1
    assert common.base_dir("tiny", 1) == one and Transformer.from_pretrained(one).args.n_layers == 1
    before = weights(one)

    two = pretrain.tiny_base(2)  # another length: its own directory, the first one untouched
    assert two == model.tiny_dir(2) != one and json.loads((two / "built_from.json").read_text())["steps"] == 2
    assert any(not torch.equal(before[k], w) for k, w in weights(two).items())
    with pytest.raises(CheckpointNotFound, match=r"python pretrain.py --steps 700"):
        common.base_dir("tiny")  # 700 steps: not built here
    run = tmp_path / "run"  # a run trained on the 2-step base, whose stored base_path is gone
    run.mkdir()
    common.save_checkpoint(run, {"w": torch.zeros(1)}, {"step": 0, "adapter": None, "base_path": str(tmp_path / "gone"),
                                                        "config": {"base": "tiny", "pretrain_steps": 2}})
    assert common.open_run(run)[1] == two and common.open_run(run, base="tiny")[1] == two

    stamp = (one / "built_from.json").read_text()
    with monkeypatch.context() as m:  # the same length and text again: reused, nothing trained
        m.setattr(pretrain, "train_tokenizer", lambda *a, **k: pytest.fail("the cached base was built again"))
        assert pretrain.tiny_base(1) == one
    small.append("a sentence the first base never saw")
    assert pretrain.tiny_base(1) == one and (one / "built_from.json").read_text() != stamp
    assert sorted(p.name for p in model.TINY_BASE.iterdir()) == ["1-steps", "2-steps"]  # no temporary left


def test_pretrain_command_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--steps", "0"])
    assert e.value.code == 2
    # model.py takes "tiny" (the 700-step base): not built in an empty cache, which it says in one line
    res = subprocess.run([sys.executable, "model.py", "tiny"], cwd=ROOT, capture_output=True, text=True,
                         timeout=240, env={**os.environ, "TEAMLORA_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert (res.returncode, res.stdout) == (2, "") and res.stderr.count("\n") == 1, res.stderr
    assert res.stderr.startswith("error: tiny: the tiny base of 700 pretraining steps is not built yet")
