"""data.py: reading and checking mixtures, loss masks and truncation, the task sampler, the tokenizer."""
import gzip
import json
from collections import Counter

import pytest
import sentencepiece as spm
import torch

import data
from data import IGNORE, Example

GOOD = {"task": "t", "instruction": "Say yes or no.", "input": "maybe", "output": "yes", "choices": ["yes", "no"]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ----------------------------------------------------------------------------- reading

def test_builtin_mixture(builtin_mixture):
    train, test = builtin_mixture
    assert (len(train), len(test)) == (16000, 1600)
    assert {ex.task for ex in train} == {ex.task for ex in test} == {"nli", "sentiment", "spam", "supersense"}
    assert all(ex.choices and ex.output in ex.choices for ex in train + test)
    assert train[0].where.endswith("train.jsonl.gz:1")


BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({**GOOD, "ouput": "yes"}, "unknown key 'ouput'"),
    ({k: v for k, v in GOOD.items() if k != "instruction"}, "missing field 'instruction'"),
    ({**GOOD, "input": 3}, "field 'input' must be a string"),
    ({**GOOD, "task": " "}, "field 'task' is empty"),
    ({**GOOD, "choices": "yes"}, "'choices' must be a list"),
    ({**GOOD, "choices": ["yes", 1]}, "'choices' must be a list"),
    ({**GOOD, "choices": ["yes", "yes"]}, "duplicates"),
    ({**GOOD, "output": "perhaps"}, "'perhaps' is not one of its choices"),
]


@pytest.mark.parametrize("line,message", BAD_LINES)
def test_bad_line_names_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "x.jsonl", [GOOD, "", line])  # a blank line 2 is skipped, yet counted
    with pytest.raises(ValueError, match=message) as err:
        data.read_jsonl(path)
    assert f"{path}:3: " in str(err.value)


def test_bad_mixtures(tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        data.load_mixture(write_jsonl(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_mixture(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        data.load_mixture(tmp_path)
    mix = tmp_path / "mix"
    mix.mkdir()
    write_jsonl(mix / "train.jsonl", [GOOD])
    write_jsonl(mix / "test.jsonl", [GOOD, {**GOOD, "task": "unseen"}])
    with pytest.raises(ValueError, match=f"{mix / 'test.jsonl'}:2: task 'unseen' has no training examples"):
        data.load_mixture(mix)
    write_jsonl(mix / "test.jsonl", [{k: v for k, v in GOOD.items() if k != "choices"}])
    with pytest.raises(ValueError, match=f"{mix / 'test.jsonl'}:1: task 't' mixes"):
        data.load_mixture(mix)


def test_gzip_directory_and_single_file(tmp_path):
    with gzip.open(tmp_path / "train.jsonl.gz", "wt") as f:
        f.write(json.dumps(GOOD) + "\n\n" + json.dumps({**GOOD, "output": "no"}) + "\n")
    write_jsonl(tmp_path / "test.jsonl", [GOOD])
    train, test = data.load_mixture(tmp_path)
    assert [ex.output for ex in train] == ["yes", "no"] and train[1].where.endswith("train.jsonl.gz:3")
    assert len(test) == 1
    train, test = data.load_mixture(tmp_path / "test.jsonl")  # a single file: all training data
    assert len(train) == 1 and test == []


# ----------------------------------------------------------------------------- prompts, masks, truncation

def test_prompt_template():
    ex = Example("t", "Do it.", "the input", "out")
    assert data.prompt_text(ex) == "### Instruction:\nDo it.\n\n### Input:\nthe input\n\n### Response:\n"
    ex.input = ""
    assert data.prompt_text(ex) == "### Instruction:\nDo it.\n\n### Response:\n"


def test_loss_mask_is_answer_and_eos(builtin_mixture, sp_tokenizer):
    tok = sp_tokenizer
    train, _ = builtin_mixture
    for ex in train[::997] + [Example("t", "No input here.", "", "a longer free answer 42")]:
        for answer in (None, *(ex.choices or [])):
            x, y, truncated = data.encode_example(tok, ex, 512, answer)
            assert len(x) == len(y) <= 512 and not truncated
            assert x[0] == tok.bos_id and y[-1] == tok.eos_id
            assert all(t == IGNORE or t == nxt for t, nxt in zip(y, x[1:]))  # targets are inputs shifted by one
            first = next(i for i, t in enumerate(y) if t != IGNORE)
            assert IGNORE not in y[first:]  # the prompt is a masked prefix, the answer an unmasked suffix
            assert tok.decode(y[first:-1]) == (ex.output if answer is None else answer)
            assert tok.decode(x[1:first + 1]).replace(" ", "") == data.prompt_text(ex).replace(" ", "")


def test_truncation_keeps_instruction_and_answer(tmp_path, sp_tokenizer):
    tok = sp_tokenizer
    ex = Example("t", "Is this spam?", " ".join(map(str, range(100))), "spam", ["spam", "ham"], "x.jsonl:7")
    x, y, truncated = data.encode_example(tok, ex, 48)
    assert truncated and len(x) == 48
    head = tok.encode("### Instruction:\nIs this spam?\n\n### Input:\n", False, False)
    body = tok.encode(ex.input, False, False)
    tail = tok.encode("\n\n### Response:\n", False, False)
    answer = tok.encode("spam", False, False)
    kept = 48 - 1 - len(head) - len(tail) - len(answer)
    assert x == [tok.bos_id] + head + body[:kept] + tail + answer  # the input loses its end
    assert [t for t in y if t != IGNORE] == answer + [tok.eos_id]

    write_jsonl(tmp_path / "x.jsonl", ["", "", {**GOOD, "output": "no " * 40, "choices": None}])
    (long,) = data.read_jsonl(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match=f"{tmp_path / 'x.jsonl'}:3: .*seq_len 32"):
        data.encode_example(tok, long, 32)


def test_dataset_and_collate(sp_tokenizer, capsys):
    tok = sp_tokenizer
    examples = [Example("b", "Say it.", "", "yes"), Example("a", "Is this spam?", "buy " * 80, "spam"),
                Example("a", "Is this spam?", "hello", "ham")]
    ds = data.TaskDataset(examples, tok, 64)
    assert capsys.readouterr().out == "truncated 1 of 3 examples (input shortened to fit seq_len 64)\n"
    assert ds.tasks == ["a", "b"] and ds.task_of == [1, 0, 0] and len(ds) == 3
    data.TaskDataset(examples[:1], tok, 64, tasks=ds.tasks)
    assert capsys.readouterr().out == ""  # nothing to report
    batch = data.collate([ds[i] for i in range(3)], tok.pad_id)
    lengths = [len(ds[i][0]) for i in range(3)]
    assert batch["tokens"].shape == batch["targets"].shape == (3, max(lengths)) == (3, 64)
    assert batch["task"].tolist() == [1, 0, 0]
    for i, n in enumerate(lengths):
        assert batch["tokens"][i, :n].tolist() == ds[i][0] and batch["targets"][i, :n].tolist() == ds[i][1]
        assert (batch["tokens"][i, n:] == tok.pad_id).all() and (batch["targets"][i, n:] == IGNORE).all()


# ----------------------------------------------------------------------------- task sampling

SIZES = [4000, 1000, 250, 50]
TASK_OF = [t for t, n in enumerate(SIZES) for _ in range(n)]


def test_sampler_temperature_one_is_every_example_once():
    s = data.MixtureSampler(TASK_OF, seed=3)
    e = s.epoch(0)
    assert sorted(e) == list(range(len(TASK_OF))) and len(s) == len(e)
    assert e != sorted(e)  # shuffled
    assert data.task_proportions(e, TASK_OF) == {t: n / sum(SIZES) for t, n in enumerate(SIZES)}


def test_sampler_temperature_two():
    s = data.MixtureSampler(TASK_OF, temperature=2.0)
    e = s.epoch(0)
    assert len(e) == sum(SIZES)
    counts = Counter(TASK_OF[i] for i in e)
    weights = [n ** 0.5 for n in SIZES]
    for t, n in enumerate(SIZES):
        share = sum(SIZES) * weights[t] / sum(weights)
        assert abs(counts[t] - share) < 1  # exact up to rounding, by construction
        repeats = Counter(i for i in e if TASK_OF[i] == t).values()
        assert max(repeats) - min(repeats) <= 1 and len(repeats) == min(n, counts[t])  # whole passes first


def test_sampler_cap_seed_and_epochs():
    s = data.MixtureSampler(TASK_OF, cap=300, seed=1)
    e0, e1 = s.epoch(0), s.epoch(1)
    assert Counter(TASK_OF[i] for i in e0) == {0: 300, 1: 300, 2: 250, 3: 50}
    assert set(e0) == set(e1) and e0 != e1  # the capped subset is fixed, the order is not
    assert e0 == data.MixtureSampler(TASK_OF, cap=300, seed=1).epoch(0)
    assert set(e0) != set(data.MixtureSampler(TASK_OF, cap=300, seed=2).epoch(0))


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_sampler_shards(temperature):
    world = 3
    full = data.MixtureSampler(TASK_OF, temperature, seed=5).epoch(7)
    shards = [data.MixtureSampler(TASK_OF, temperature, seed=5, rank=r, world_size=world) for r in range(world)]
    parts = [s.epoch(7) for s in shards]
    kept = len(full) // world * world
    assert all(len(p) == len(s) == kept // world for p, s in zip(parts, shards))
    assert sum(map(Counter, parts), Counter()) == Counter(full[:kept])  # together: the epoch once
    if temperature == 1.0:
        assert not set(parts[0]) & set(parts[1]) and not set(parts[1]) & set(parts[2])


# ----------------------------------------------------------------------------- tokenizer and pretraining text

def test_tokenizer_trains_and_round_trips(tmp_path):
    texts = [f"Line {i}: the year 18{i % 100:02d} and a sum of {i * 37} pounds." for i in range(300)]
    path = data.train_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    assert path == tmp_path / "tok.model" and sorted(p.name for p in tmp_path.iterdir()) == ["tok.model"]
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert (sp.bos_id(), sp.eos_id(), sp.unk_id(), sp.pad_id()) == (1, 2, 0, -1)
    text = "Paid 1811 pounds,  twice:\n漢 ok"
    ids = sp.encode(text)
    assert sp.decode(ids) == text
    pieces = [sp.id_to_piece(i) for i in ids]
    assert [p for p in pieces if any(c.isdigit() for c in p) and not p.startswith("<0x")] == ["1", "8", "1", "1"]
    assert "<0xE6>" in pieces and sp.unk_id() not in ids  # 漢 = E6 BC A2, by byte fallback
    again = data.train_tokenizer(texts, tmp_path / "again", vocab_size=300)
    assert again.read_bytes() == path.read_bytes()


def test_pretraining_texts_and_lm_batches(sp_tokenizer):
    train = [Example("t", "Name it.", "a cat", "SECRET", None), Example("u", "Pick.", "", "b", ["a", "b"]),
             Example("u", "Pick again.", "x", "a", ["a", "b"])]
    texts = list(data.pretraining_texts(train))
    assert texts[0] == "PRIDE AND PREJUDICE" and len(texts) > 10000  # the corpus first
    assert texts[-4:] == ["Name it.\na cat", "Pick.", "Pick again.\nx", "Answers: a, b"]
    assert not any("SECRET" in t for t in texts)

    tok = sp_tokenizer
    stream = data.lm_stream(tok, ["one two", "three"])
    assert stream.tolist() == tok.encode("one two", True, True) + tok.encode("three", True, True)
    stream = torch.arange(100)
    x, y = data.lm_batch(stream, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16) and torch.equal(y, x + 1)
    assert torch.equal(x, data.lm_batch(stream, 4, 16, torch.Generator().manual_seed(0))[0])
    with pytest.raises(ValueError, match="seq_len"):
        data.lm_batch(stream, 1, 100, torch.Generator())
