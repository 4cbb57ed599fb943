"""data.py: reading and checking mixtures, loss masks and truncation, the task sampler, the tokenizer."""
import gzip
import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import data
from data import IGNORE, Example
from model import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
GOOD = {"task": "t", "instruction": "Say yes or no.", "input": "maybe", "output": "yes", "choices": ["yes", "no"]}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def bpe_tokenizer(builtin_mixture, tmp_path_factory):
    """A byte-level BPE tokenizer.json like SmolLM2's, trained in-process with the tokenizers package.
    Trained on whole prompts and answers, so that its merges know the template's junctions."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    hf.train_from_iterator([data.prompt_text(ex) + ex.output for ex in builtin_mixture[0][::40]], trainer)
    folder = tmp_path_factory.mktemp("bpe")
    hf.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}))
    return Tokenizer(folder / "tokenizer.json")


TOKENIZERS = ["sp_tokenizer", "bpe_tokenizer"]  # SentencePiece with a dummy prefix (like LLaMA-2's), byte-level BPE

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
    with pytest.raises(FileNotFoundError, match="nowhere") as err:
        data.load_mixture(tmp_path / "nowhere")
    assert isinstance(err.value, data.DataError)  # what the entry points print as one line
    with pytest.raises(FileNotFoundError, match="train.jsonl") as err:
        data.load_mixture(tmp_path)
    assert isinstance(err.value, data.DataError)
    mix = tmp_path / "mix"
    mix.mkdir()
    write_jsonl(mix / "train.jsonl", [GOOD])
    write_jsonl(mix / "test.jsonl", [GOOD, {**GOOD, "task": "unseen"}])
    with pytest.raises(ValueError, match=f"{mix / 'test.jsonl'}:2: task 'unseen' has no training examples"):
        data.load_mixture(mix)
    write_jsonl(mix / "test.jsonl", [{k: v for k, v in GOOD.items() if k != "choices"}])
    with pytest.raises(ValueError, match=f"{mix / 'test.jsonl'}:1: task 't' mixes"):
        data.load_mixture(mix)
    (mix / "test.jsonl").unlink()
    (mix / "test.jsonl.gz").write_bytes(b"not gzip at all\n")
    with pytest.raises(data.DataError, match=f"{mix / 'test.jsonl.gz'}: cannot read it"):
        data.load_mixture(mix)


def test_every_bad_line_is_reported(tmp_path):
    mix = tmp_path / "mix"
    mix.mkdir()
    train = write_jsonl(mix / "train.jsonl", [GOOD, "{oops", {**GOOD, "ouput": "x"}, GOOD,
                                              {**GOOD, "task": "u"}, {**GOOD, "task": "u", "output": 1}])
    test = write_jsonl(mix / "test.jsonl", [{**GOOD, "output": "perhaps"}, {**GOOD, "task": "u"},
                                            {**GOOD, "task": "unseen"}, "[]"])
    with pytest.raises(data.DataError) as err:
        data.load_mixture(mix)
    assert str(err.value).splitlines() == [
        f"{train}:2: invalid JSON at column 2: Expecting property name enclosed in double quotes",
        f"{train}:3: unknown key 'ouput' (allowed: task, instruction, input, output, choices, answer)",
        f"{train}:6: field 'output' must be a string, got int",
        f"{test}:1: output 'perhaps' is not one of its choices ['yes', 'no']",
        f"{test}:4: expected a JSON object, got list",
        f"{test}:3: task 'unseen' has no training examples",
    ]
    # A long run of bad lines: the first MAX_REPORTED, then how many more.
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD] + ["{"] * 25)
    with pytest.raises(data.DataError) as err:
        data.read_jsonl(path)
    lines = str(err.value).splitlines()
    assert len(lines) == data.MAX_REPORTED + 1 and lines[0].startswith(f"{path}:2: invalid JSON")
    assert lines[-2].startswith(f"{path}:{data.MAX_REPORTED + 1}: ") and lines[-1] == "... and 5 more"


def test_a_task_has_one_set_of_choices(tmp_path):
    mix = tmp_path / "mix"
    mix.mkdir()
    train = write_jsonl(mix / "train.jsonl", [GOOD, {**GOOD, "choices": ["no", "yes"]}])  # order is free
    test = write_jsonl(mix / "test.jsonl", [GOOD, {**GOOD, "choices": ["yes", "no", "maybe"]}])
    with pytest.raises(data.DataError) as err:
        data.load_mixture(mix)
    assert str(err.value) == (f"{test}:2: task 't' has choices ['yes', 'no', 'maybe'], "
                              f"but {train}:1 has ['yes', 'no']")
    write_jsonl(mix / "train.jsonl", [GOOD, {**GOOD, "output": "no", "choices": ["no", "nope"]}])
    write_jsonl(mix / "test.jsonl", [GOOD])
    with pytest.raises(data.DataError, match=f"{train}:2: task 't' has choices \\['no', 'nope'\\], but {train}:1"):
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

ALPACA = {"instruction": "Give a synonym.", "input": "happy", "output": "glad"}  # alpaca_data.json's fields


def test_json_array_files_with_and_without_task(tmp_path):
    # LLM-Adapters' commonsense_170k.json: an array, no task, a long output and its short answer
    rows = [ALPACA, {**ALPACA, "output": "the correct answer is true", "answer": "true"},
            {**GOOD, "task": "named"}, {"instruction": "What is 37/2?", "output": "18.5", "answer": 18.5}]
    path = tmp_path / "commonsense_170k.json"
    path.write_text(json.dumps(rows, indent=2))
    train, test = data.load_mixture(path)
    assert [ex.task for ex in train] == ["commonsense_170k"] * 2 + ["named", "commonsense_170k"] and test == []
    assert [ex.answer for ex in train] == [None, "true", None, "18.5"] and train[1].output.endswith("is true")
    assert train[3].input == ""  # an input left out is an empty one
    starts = [n for n, line in enumerate(path.read_text().splitlines(), 1) if line == "  {"]  # where records begin
    assert [ex.where for ex in train] == [f"{path}:{n}: record {i}" for i, n in enumerate(starts)]
    assert starts[:2] == [2, 7]
    gz = tmp_path / "math_10k.json.gz"
    with gzip.open(gz, "wt") as f:
        json.dump(rows[:2], f)  # all on one line
    assert [(ex.task, ex.where) for ex in data.read_jsonl(gz)] == [("math_10k", f"{gz}:1: record 0"),
                                                                   ("math_10k", f"{gz}:1: record 1")]
    # a mixture directory of arrays: records without a task take the directory's name in both splits
    mix = tmp_path / "alpaca"
    mix.mkdir()
    (mix / "train.json").write_text(json.dumps([ALPACA]))
    (mix / "test.json").write_text(json.dumps([ALPACA]))
    train, test = data.load_mixture(mix)
    assert train[0].task == test[0].task == "alpaca"
    # a .json of JSON Lines (common on the Hub) and an empty array
    (tmp_path / "lines.json").write_text(json.dumps(ALPACA) + "\n" + json.dumps(ALPACA) + "\n")
    assert [ex.where for ex in data.read_jsonl(tmp_path / "lines.json")] == [f"{tmp_path / 'lines.json'}:{n}"
                                                                              for n in (1, 2)]
    (tmp_path / "empty.json").write_text("[ ]")
    with pytest.raises(data.DataError, match="no examples"):
        data.read_jsonl(tmp_path / "empty.json")


def test_a_broken_json_array_is_reported_at_its_record(tmp_path):
    path = tmp_path / "alpaca_data.json"
    good = json.dumps(ALPACA)
    path.write_text("[\n" + ",\n".join([good, json.dumps({**ALPACA, "ouput": "x"}), good,
                                         json.dumps({k: v for k, v in ALPACA.items() if k != "output"})]) + "\n]\n")
    with pytest.raises(data.DataError) as err:
        data.read_jsonl(path)
    assert str(err.value).splitlines() == [
        f"{path}:3: record 1: unknown key 'ouput' (allowed: task, instruction, input, output, choices, answer)",
        f"{path}:5: record 3: missing field 'output'"]
    # bad JSON in record 2 (line 4): the records before it are checked, the rest cannot be read
    path.write_text("[\n" + ",\n".join([good, json.dumps({**ALPACA, "ouput": "x"}), good[:-1] + ",}", good]) + "]")
    with pytest.raises(data.DataError) as err:
        data.read_jsonl(path)
    assert str(err.value).splitlines() == [
        f"{path}:3: record 1: unknown key 'ouput' (allowed: task, instruction, input, output, choices, answer)",
        f"{path}:4: record 2: invalid JSON at column {len(good) + 1}: Expecting property name enclosed in "
        "double quotes"]
    for text, message in [(f"[{good} {good}]", "1: after record 0: expected ',' or ']'"),
                          (f"[{good},\n]", "2: record 1: invalid JSON at column 1: Expecting value"),
                          (f"[{good}]\n[]", "2: text after the array's closing ']'"),
                          (f"[{good}", "1: after record 0: expected ',' or ']'")]:
        path.write_text(text)
        with pytest.raises(data.DataError, match=f"^{path}:" + message.replace("[", "\\[").replace("(", "\\(")):
            data.read_jsonl(path)
    path.write_bytes(b'[\n{"instruction": "\xff"}]')
    with pytest.raises(data.DataError, match=f"^{path}:2: invalid JSON, not UTF-8"):
        data.read_jsonl(path)


def test_prompt_template():
    ex = Example("t", "Do it.", "the input", "out")
    assert data.prompt_text(ex) == "### Instruction:\nDo it.\n\n### Input:\nthe input\n\n### Response:\n"
    ex.input = ""
    assert data.prompt_text(ex) == "### Instruction:\nDo it.\n\n### Response:\n"


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_loss_mask_is_answer_and_eos(builtin_mixture, tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    train, _ = builtin_mixture
    for ex in train[::997] + [Example("t", "No input here.", "", "a longer free answer 42"),
                              Example("t", "Pick one.", '"Quoted" (input)\n', "(a)", ["(a)", "b c", "\nd"])]:
        prompts = set()
        for answer in (None, *(ex.choices or [])):
            x, y, truncated = data.encode_example(tok, ex, 512, answer)
            assert len(x) == len(y) <= 512 and not truncated
            assert x[0] == tok.bos_id and y[-1] == tok.eos_id
            assert all(t == IGNORE or t == nxt for t, nxt in zip(y, x[1:]))  # targets are inputs shifted by one
            first = next(i for i, t in enumerate(y) if t != IGNORE)
            assert IGNORE not in y[first:]  # the prompt is a masked prefix, the answer an unmasked suffix
            answer = ex.output if answer is None else answer
            assert tok.decode(y[first:-1]) == answer.lstrip(" ")  # (SentencePiece drops a leading space)
            # The template verbatim, and the answer right after it: no space where the parts join.
            assert tok.decode(x[1:first + 1]) == data.prompt_text(ex)
            assert tok.decode(x[1:]) == data.prompt_text(ex) + answer
            if ex.where:  # a built-in example: the ids are those of the whole text encoded at once
                assert x[1:] == tok.encode(data.prompt_text(ex) + answer, False, False)
            prompts.add(tuple(x[:first + 1]))
        assert len(prompts) == 1  # every choice follows the same prompt ids


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_truncation_keeps_instruction_and_answer(tmp_path, tokenizer, request):
    tok = request.getfixturevalue(tokenizer)
    ex = Example("t", "Is this spam?", " ".join(map(str, range(100))), "spam", ["spam", "ham"], "x.jsonl:7")
    x, y, truncated = data.encode_example(tok, ex, 64)
    assert truncated and len(x) == 64
    first = next(i for i, t in enumerate(y) if t != IGNORE)
    prompt, answer = tok.decode(x[1:first + 1]), y[first:]
    head, tail = "### Instruction:\nIs this spam?\n\n### Input:\n", "\n\n### Response:\n"
    assert prompt.startswith(head) and prompt.endswith(tail)
    kept = prompt[len(head):-len(tail)]  # the template with a shortened input ...
    body = tok.encode(ex.input, False, False)
    cuts = [tok.decode(body[:m]) for m in range(len(body))]
    assert kept in cuts and len(kept) > 10  # ... cut after one of its tokens ...
    longer = Example("t", ex.instruction, cuts[cuts.index(kept) + 1], "spam", ex.choices)
    assert len(data.encode_example(tok, longer, 64 + 10)[0]) > 64  # ... the longest cut that fits
    assert x == [tok.bos_id] + tok.encode(head + kept + tail, False, False) + answer[:-1]
    assert tok.decode(answer) == "spam" and answer[-1] == tok.eos_id

    write_jsonl(tmp_path / "x.jsonl", ["", "", {**GOOD, "output": "no " * 40, "choices": None}])
    (long,) = data.read_jsonl(tmp_path / "x.jsonl")
    with pytest.raises(ValueError, match=f"{tmp_path / 'x.jsonl'}:3: .*seq_len 32"):
        data.encode_example(tok, long, 32)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_truncated_choices_follow_the_same_prompt(tokenizer, request):
    """The room left for the input is set by the longest choice, so a shortened input is the same
    for every choice scored and for the gold answer trained on."""
    tok = request.getfixturevalue(tokenizer)
    ex = Example("t", "Is this spam?", "buy now " * 60, "ham", ["ham", "spam, and a very long label besides"])
    seqs = [data.encode_example(tok, ex, 96, answer) for answer in (None, *ex.choices)]
    assert all(truncated for _, _, truncated in seqs)
    prompts = {tuple(x[:next(i for i, t in enumerate(y) if t != IGNORE) + 1]) for x, y, _ in seqs}
    assert len(prompts) == 1 and max(len(x) for x, _, _ in seqs) == 96


def test_answer_after_a_token_spanning_the_newline(tmp_path):
    """A vocabulary whose token ":\\n(" would join the prompt's last line to an answer "(A)"."""
    def tokenizer(name, symbols):
        proto = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(["Pick (A) or (B): 10 of them.", "### Response:\n(A) is it"] * 50),
            model_writer=proto, model_type="bpe", vocab_size=320, user_defined_symbols=symbols,
            byte_fallback=True, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, minloglevel=2)
        (tmp_path / name).write_bytes(proto.getvalue())
        return Tokenizer(tmp_path / name)

    tok = tokenizer("a.model", [":\n("])
    ex = Example("t", "Pick.", "", "(A)", ["(A)", "(B)"])
    assert tok.encode(data.prompt_text(ex) + "(A)", False, False)[-3] == tok.encode(":\n(", False, False)[-1]
    for answer in ex.choices:
        x, y, _ = data.encode_example(tok, ex, 64, answer)
        first = next(i for i, t in enumerate(y) if t != IGNORE)
        assert tok.decode(x[1:first + 1]) == data.prompt_text(ex) and tok.decode(x[1:]) == data.prompt_text(ex) + answer
    tok = tokenizer("b.model", [":\n(", "0("])  # no boundary before "(" at all: a clear error
    with pytest.raises(data.DataError, match="'\\(A\\)' merges with the prompt's last token"):
        data.encode_example(tok, Example("t", "Pick.", "", "(A)", where="x.jsonl:2"), 64)


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


def test_dataset_reports_every_example_that_cannot_fit(sp_tokenizer):
    examples = [Example("a", "Say it.", "", "yes", where="x.jsonl:1"),
                *(Example("a", "Say it. " * 30, "", "yes", where=f"x.jsonl:{n}") for n in (2, 3)),
                Example("b", "Say it.", "", "yes", where="x.jsonl:4")]
    with pytest.raises(data.DataError) as err:
        data.TaskDataset(examples, sp_tokenizer, 64, tasks=["a"])
    assert [line.split(": ")[0] for line in str(err.value).splitlines()] == ["x.jsonl:2", "x.jsonl:3", "x.jsonl:4"]
    assert "seq_len 64" in str(err.value) and "task 'b' is not one of ['a']" in str(err.value)


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


# ----------------------------------------------------------------------------- the tokenizer

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


# ----------------------------------------------------------------------------- the command line

def test_command_line(tmp_path):
    """`python data.py [MIXTURE]`: help, a summary, and a bad mixture as `error:` lines with exit
    status 2; run where numpy is missing, torch's warning about it is not shown (nor by model.py)."""
    no_numpy = tmp_path / "no-numpy" / "numpy"
    no_numpy.mkdir(parents=True)
    (no_numpy / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'numpy'\", name='numpy')\n")
    env = {**os.environ, "PYTHONPATH": str(no_numpy.parent)}

    def run(*args):
        return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    out = run("data.py", "--help")
    assert (out.returncode, out.stderr) == (0, "") and out.stdout.startswith("usage: data.py [-h] [mixture]")
    mix = write_jsonl(tmp_path / "mix.jsonl", [GOOD, {**GOOD, "output": "no"}, GOOD])
    out = run("data.py", str(mix))
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.splitlines() == [f"train: 3 examples from {mix} (JSON Lines)", "3 train / 0 test examples",
                                       f"{'t':>12} train      3: yes 2, no 1"]
    # an Alpaca-style array: what was read, and the answers beside long outputs
    array = tmp_path / "alpaca_data.json"
    array.write_text(json.dumps([ALPACA, {**ALPACA, "output": "the correct answer is true", "answer": "true"}]))
    out = run("data.py", str(array))
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.splitlines() == [f"train: 2 examples from {array} (a JSON array)", "2 train / 0 test examples",
                                       f"{'alpaca_data':>12} train      2: glad 1, true 1"]
    write_jsonl(mix, [GOOD, "{", {**GOOD, "task": ""}])
    out = run("data.py", str(mix))
    assert (out.returncode, out.stdout) == (2, "")
    assert out.stderr.splitlines() == [
        f"error: {mix}:2: invalid JSON at column 2: Expecting property name enclosed in double quotes",
        f"{mix}:3: field 'task' is empty"]
    out = run("-c", "import model")
    assert (out.returncode, out.stderr) == (0, "")
