"""Data for multi-task fine-tuning: reading a task mixture, the prompt template, loss masks,
temperature-based task sampling, and training a SentencePiece tokenizer. One job: the way from a
JSON Lines file to a batch of token ids (the tiny base's corpus and pretraining are in pretrain.py).

    import data
    train, test = data.load_mixture("my_mixture/")        # or load_mixture() for the built-in one
    ds = data.TaskDataset(train, tok, seq_len=256)
    sampler = data.MixtureSampler(ds.task_of, temperature=2.0, rank=rank, world_size=world_size)
    order = sampler.epoch(epoch)                           # this rank's indices for this epoch
    for i in range(0, len(order), batch_size):
        batch = data.collate([ds[j] for j in order[i:i + batch_size]], tok.pad_id)

`python data.py [MIXTURE]` checks a mixture and prints what it read: files, tasks, label counts.

The format: JSON Lines, one example per line (blank lines are skipped), or a JSON array of the
same objects (a file that starts with "[", e.g. Alpaca's alpaca_data.json or LLM-Adapters'
commonsense_170k.json, read as they are),

    {"task": "nli", "instruction": "Does the premise entail the hypothesis? ...",
     "input": "Premise: ... Hypothesis: ...", "output": "neutral",
     "choices": ["entailment", "neutral", "contradiction"]}

task, instruction, input and output are strings (task and output not empty; input may be
empty or left out). task is optional: a record without one takes its file's name
(commonsense_170k for commonsense_170k.json.gz), or its directory's for a mixture directory's
train and test files. choices is optional: a list of two or more distinct strings that contains output; it
makes the example scorable by likelihood (each choice's answer tokens are scored, the best
wins). A task with choices is a classification over one set of labels: every example of the
task, in train and in test, has the same choices (in any order), and a task has choices on
all of its examples or on none. For multiple-choice questions put each question's options in
the input and make the choices their labels ("A", "B", ...). answer is optional: the short
answer inside a long output (LLM-Adapters' "the correct answer is true" has answer "true"; a
number is taken as its text), kept on the Example for evaluation; training learns output. Any
other key is an error, so a misspelt "ouput" cannot silently drop data.

A mixture is either a directory holding train.jsonl and test.jsonl (or .json; either may be
gzipped, train.jsonl.gz), or a single file (.jsonl, .json, gzipped or not): all of it is
training data and the test split is empty. Every task in test must have training examples.
Every problem is reported at once, in one DataError, a line each naming the file and line (in
an array: the line where the record starts, and its index; the first 20, then how many more):

    my_mix/train.jsonl:3: missing field 'output'
    my_mix/test.jsonl:41: task 'spam' has choices ['spam', 'junk'], but my_mix/train.jsonl:1 has ['spam', 'ham']
    alpaca_data.json:1207: record 241: unknown key 'ouput' (allowed: task, instruction, input, output, choices, answer)

Bad JSON inside an array ends what can be read of that file (the records before it are checked).

The prompt (prompt_text) is fixed; the Input block is left out when input is empty:

    ### Instruction:
    {instruction}

    ### Input:
    {input}

    ### Response:
    {output}</s>

The model sees this text verbatim: decoding an example's tokens gives prompt_text(ex) + output.
The loss covers the answer tokens and the end-of-sequence token only.
"""
import argparse
import functools
import gzip
import io
import itertools
import json
import os
import random
import re
import sys
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional

import sentencepiece as spm

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; unused here
import torch  # noqa: E402

BUILTIN = Path(__file__).parent / "data" / "minicme"
IGNORE = -100  # target value that F.cross_entropy(ignore_index=-100) skips

FIELDS = ("task", "instruction", "input", "output")
OPTIONAL = ("choices", "answer")
MAX_REPORTED = 20  # problems listed in one DataError; the rest are counted


class DataError(ValueError):
    """A mixture that cannot be used: bad JSON, a missing field, a wrong path (a user's mistake, not a bug)."""


class MissingDataError(DataError, FileNotFoundError):
    """A mixture file or directory that is not there."""


@dataclass
class Example:
    task: str
    instruction: str
    input: str
    output: str
    choices: Optional[list[str]] = None
    answer: Optional[str] = None  # the short answer inside a long output (LLM-Adapters' files), for evaluation
    where: str = ""  # "path:line" (a JSON array's: "path:line: record i"), for error messages


class _Problems:
    """Problems found so far, raised together as one DataError with one line each."""

    def __init__(self):
        self.lines, self.count = [], 0

    def add(self, line: str):
        self.count += 1
        if len(self.lines) < MAX_REPORTED:
            self.lines.append(line)

    def check(self):
        if self.count:
            more = self.count - len(self.lines)
            raise DataError("\n".join(self.lines + [f"... and {more} more"] * (more > 0)))


# ----------------------------------------------------------------------------- reading

def _example(obj, where: str, task: str) -> Example:
    """One record as an Example; task: the task of a record without one (its file's)."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in obj:
        if key not in FIELDS + OPTIONAL:
            raise DataError(f"{where}: unknown key {key!r} (allowed: {', '.join(FIELDS + OPTIONAL)})")
    obj = {"task": task, "input": "", **obj}  # Alpaca-style files often leave an empty input out
    if isinstance(obj.get("answer"), (int, float)) and not isinstance(obj["answer"], bool):
        obj["answer"] = str(obj["answer"])  # a math answer written as a number
    for key in FIELDS + ("answer",) * ("answer" in obj):
        if key not in obj:
            raise DataError(f"{where}: missing field {key!r}")
        if not isinstance(obj[key], str):
            raise DataError(f"{where}: field {key!r} must be a string, got {type(obj[key]).__name__}")
    for key in ("task", "output"):
        if not obj[key].strip():
            raise DataError(f"{where}: field {key!r} is empty")
    choices = obj.get("choices")
    if choices is not None:
        if not (isinstance(choices, list) and len(choices) >= 2
                and all(isinstance(c, str) and c.strip() for c in choices)):
            raise DataError(f"{where}: 'choices' must be a list of two or more non-empty strings")
        if len(set(choices)) < len(choices):
            raise DataError(f"{where}: 'choices' has duplicates: {choices}")
        if obj["output"] not in choices:
            raise DataError(f"{where}: output {obj['output']!r} is not one of its choices {choices}")
    return Example(**obj, where=where)


def _lines(path: Path, raw: bytes, problems: _Problems) -> Iterator[tuple[object, str]]:
    """(record, "path:line") of each non-blank line of a JSON Lines file; bad lines go to problems."""
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line.rstrip(b"\r")), f"{path}:{n}"
        except json.JSONDecodeError as e:
            problems.add(f"{path}:{n}: invalid JSON at column {e.colno}: {e.msg.removesuffix(' at')}")
        except UnicodeDecodeError as e:
            problems.add(f"{path}:{n}: invalid JSON, not UTF-8 ({e})")


_SPACE = re.compile(r"[ \t\n\r]*")  # what JSON allows between values
NEWLINE, NEWLINE_STR = b"\n", "\n"  # (f-strings of Python 3.11 take no backslash)


def _array(path: Path, raw: bytes, problems: _Problems) -> Iterator[tuple[object, str]]:
    """(record, "path:line: record i") of each element of a JSON array file, line = where the
    record starts. Bad JSON ends the file's records: its place is reported to problems."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        problems.add(f"{path}:{raw.count(NEWLINE, 0, e.start) + 1}: invalid JSON, not UTF-8 ({e})")
        return
    decoder, line, counted = json.JSONDecoder(), 1, 0
    pos = _SPACE.match(text, _SPACE.match(text).end() + 1).end()  # after the opening "["
    for i in itertools.count():
        if i == 0 and text.startswith("]", pos):
            break
        try:
            record, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            problems.add(f"{path}:{e.lineno}: record {i}: invalid JSON at column {e.colno}: "
                         f"{e.msg.removesuffix(' at')}")
            return
        line, counted = line + text.count(NEWLINE_STR, counted, pos), pos  # counted once, however long the file
        yield record, f"{path}:{line}: record {i}"
        pos = _SPACE.match(text, end).end()
        if text.startswith("]", pos):
            break
        if not text.startswith(",", pos):
            where = f"{path}:{line + text.count(NEWLINE_STR, counted, pos)}"
            problems.add(f"{where}: after record {i}: expected ',' or ']'")
            return
        pos = _SPACE.match(text, pos + 1).end()
    pos = _SPACE.match(text, pos + 1).end()
    if pos < len(text):
        problems.add(f"{path}:{line + text.count(NEWLINE_STR, counted, pos)}: text after the array's closing ']'")


def _stem(path: Path) -> str:
    """The file's name without .gz, .json or .jsonl: commonsense_170k.json.gz -> commonsense_170k."""
    name = path.name.removesuffix(".gz")
    return name.removesuffix(".jsonl").removesuffix(".json")


def _read(path: Path, problems: _Problems, task: Optional[str] = None) -> tuple[list[Example], set[str]]:
    """The good examples of one file, and every task named in any of its records (good or not);
    each bad record is added to problems. A JSON array (the file starts with "[") or JSON Lines;
    task: the task of records without one (default: the file's stem)."""
    examples, tasks, before = [], {task or _stem(path)}, problems.count
    try:
        # Bytes, not text: a bad UTF-8 sequence is then reported on its own line like bad JSON.
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError) as e:  # unreadable, not gzip, a gzip cut short
        problems.add(f"{path}: cannot read it ({e})")
        return examples, tasks
    # a .jsonl is JSON Lines; another name (.json) is an array when it starts with "[" (a .json of JSON Lines is common)
    records = _array if _stem(path) + ".jsonl" != path.name.removesuffix(".gz") and raw.lstrip()[:1] == b"[" else _lines
    for obj, where in records(path, raw, problems):
        if isinstance(obj, dict) and isinstance(obj.get("task"), str):
            tasks.add(obj["task"])
        try:
            examples.append(_example(obj, where, task or _stem(path)))
        except DataError as e:
            problems.add(str(e))
    if not examples and problems.count == before:
        problems.add(f"{path}: no examples (the file is empty)")
    return examples, tasks


def read_jsonl(path) -> list[Example]:
    """Read and check one file, JSON Lines or a JSON array (either may be gzipped); all its bad
    records are reported in one DataError."""
    problems = _Problems()
    examples, _ = _read(Path(path), problems)
    problems.check()
    return examples


def _split_file(folder: Path, split: str) -> Path:
    names = [f"{split}{ext}{gz}" for ext in (".jsonl", ".json") for gz in ("", ".gz")]
    found = [folder / n for n in names if (folder / n).exists()]
    if not found:
        raise MissingDataError(f"{folder}: no {split}.jsonl (or {split}.jsonl.gz, {split}.json, "
                               f"{split}.json.gz); a mixture directory holds train.jsonl and test.jsonl")
    if len(found) > 1:
        raise DataError(f"{folder}: both {found[0].name} and {found[1].name} exist; keep one")
    return found[0]


def load_mixture(path=None) -> tuple[list[Example], list[Example]]:
    """(train, test) from a mixture directory or a single .jsonl file; None: the built-in one.
    Every problem found, in both files, is reported in one DataError."""
    path = BUILTIN if path is None else Path(path)
    if not path.exists():
        raise MissingDataError(f"{path}: no such file or directory")
    problems = _Problems()
    if path.is_dir():
        files = _split_file(path, "train"), _split_file(path, "test")
        # records without a task take the directory's name, the same in both splits
        (train, named), (test, _) = (_read(f, problems, task=path.resolve().name) for f in files)
    else:
        (train, named), test = _read(path, problems), []
    first = {}  # task -> its first good training example, whose choices the task's examples share
    for ex in train:
        first.setdefault(ex.task, ex)
    for ex in train + test:
        ref = first.get(ex.task)
        if ref is None:
            if ex.task not in named:  # named on a bad training line: that line is reported already
                problems.add(f"{ex.where}: task {ex.task!r} has no training examples")
        elif (ex.choices is None) != (ref.choices is None):
            problems.add(f"{ex.where}: task {ex.task!r} mixes examples with and without 'choices' "
                         f"(compare {ref.where})")
        elif ex.choices is not None and set(ex.choices) != set(ref.choices):
            problems.add(f"{ex.where}: task {ex.task!r} has choices {ex.choices}, but {ref.where} "
                         f"has {ref.choices}")
    problems.check()
    return train, test


# ----------------------------------------------------------------------------- prompts and loss masks

RESPONSE = "\n\n### Response:\n"  # how every prompt ends


def _prompt_parts(ex: Example) -> tuple[str, str, str]:
    """The prompt as (before the input, the input, after it), so the input alone can be shortened."""
    if not ex.input:
        return f"### Instruction:\n{ex.instruction}", "", RESPONSE
    return f"### Instruction:\n{ex.instruction}\n\n### Input:\n", ex.input, RESPONSE


def prompt_text(ex: Example) -> str:
    """The fixed prompt; the answer that follows it is output + EOS."""
    return "".join(_prompt_parts(ex))


# Why the prompt is encoded in one piece: a SentencePiece tokenizer with a dummy prefix (LLaMA-2's
# tokenizer.model, the tiny base's) encodes "▁" + text, so parts encoded one by one would each start
# with a space the template lacks ("Input:\n Premise"). The answer's ids are those that follow
# RESPONSE in encode(RESPONSE + answer) ("neutral" after a newline: no "▁"), so the answer starts on
# a token boundary, and prompt + answer get the ids of their one-piece encoding wherever no token
# spans the newline before the answer (SentencePiece splits a newline from a letter, another Unicode
# script; byte-level BPE splits whitespace from words). Where one would (an answer starting with a
# newline, a vocabulary with "\n(") the answer is encoded after "0" instead, a digit being a token alone.

@functools.lru_cache(maxsize=1 << 16)  # a task's few labels are encoded once, not once per example
def _answer_ids(tok, answer: str) -> Optional[tuple[int, ...]]:
    """The answer's ids as they follow the prompt; None if no context leaves it a token boundary."""
    for context in (RESPONSE, "0"):
        before = tok.encode(context, bos=False, eos=False)
        ids = tok.encode(context + answer, bos=False, eos=False)
        if ids[:len(before)] == before:
            return tuple(ids[len(before):])
    return None


def _prompt_ids(tok, ex: Example, room: int) -> tuple[list[int], bool]:
    """The prompt's ids, shortened to room if it can be by cutting the end of its input; and
    whether it was. The shortened prompt is the template with the input cut after one of its
    tokens, encoded in one piece; the longest such cut that fits is kept."""
    head, body, tail = _prompt_parts(ex)
    ids = tok.encode(head + body + tail, bos=False, eos=False)
    if len(ids) <= room:
        return ids, False
    body_ids = tok.encode(body, bos=False, eos=False)

    def cut(m):  # the prompt with the input's first m tokens, fewer where m would split a character
        while m and not body.startswith(kept := tok.decode(body_ids[:m])):
            m -= 1
        return tok.encode(head + (kept if m else "") + tail, bos=False, eos=False)

    lo, hi = 0, len(body_ids)  # cut(hi) does not fit; cut(lo), once lo > 0, does
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if len(cut(mid)) <= room else (lo, mid)
    return cut(lo), True


def encode_example(tok, ex: Example, seq_len: int,
                   answer: Optional[str] = None) -> tuple[list[int], list[int], bool]:
    """(input_ids, targets, truncated) for one example; answer replaces ex.output (to score a choice).

    ids = bos + prompt + answer + eos; input_ids = ids[:-1], targets = ids[1:] with IGNORE
    wherever the target is still prompt, so only the answer and EOS are learned. An example
    longer than seq_len loses tokens from the end of its input, never instruction or answer.
    The prompt leaves room for the longest of the example's choices, so training and every
    choice scored in evaluation see the same prompt ids.
    """
    answer = ex.output if answer is None else answer
    answers = {a: _answer_ids(tok, a) for a in [answer, *(ex.choices or [])]}
    for a, ids in answers.items():
        if ids is None:
            raise DataError(f"{ex.where or 'example'}: the answer {a!r} merges with the prompt's last "
                            f"token under this tokenizer; it cannot start on a token boundary")
    longest = max(map(len, answers.values()))
    room = seq_len - 1 - longest  # ids hold seq_len + 1 tokens (inputs and targets are its shifts): bos, eos
    prompt, truncated = _prompt_ids(tok, ex, room)
    if len(prompt) > room:
        raise DataError(f"{ex.where or 'example'}: {len(prompt) + longest + 1} tokens even with the input "
                        f"removed (answer {longest}), more than seq_len {seq_len}")
    prompt = [tok.bos_id] + prompt
    ids = prompt + list(answers[answer]) + [tok.eos_id]
    targets = [IGNORE] * (len(prompt) - 1) + ids[len(prompt):]
    return ids[:-1], targets, truncated


class TaskDataset:
    """Encoded examples with task ids; item i is (input_ids, targets, task_id).

    tasks: the names that task ids index, sorted; pass the training set's list to a test set
    so that both number the tasks alike. Examples that cannot be used (too long for seq_len,
    an unknown task) are reported together in one DataError.
    """

    def __init__(self, examples: list[Example], tok, seq_len: int, tasks: Optional[list[str]] = None,
                 verbose: bool = True):
        self.examples = examples
        self.tasks = sorted({ex.task for ex in examples}) if tasks is None else list(tasks)
        index = {t: i for i, t in enumerate(self.tasks)}
        self.items, self.task_of, self.n_truncated = [], [], 0
        problems = _Problems()
        for ex in examples:
            if ex.task not in index:
                problems.add(f"{ex.where or 'example'}: task {ex.task!r} is not one of {self.tasks}")
                continue
            try:
                x, y, truncated = encode_example(tok, ex, seq_len)
            except DataError as e:
                problems.add(str(e))
                continue
            self.items.append((x, y))
            self.task_of.append(index[ex.task])
            self.n_truncated += truncated
        problems.check()
        if self.n_truncated and verbose:
            print(f"truncated {self.n_truncated} of {len(examples)} examples "
                  f"(input shortened to fit seq_len {seq_len})")

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return (*self.items[i], self.task_of[i])


def collate(items, pad_id: int) -> dict:
    """Right-pad a list of dataset items to the longest: tokens with pad_id, targets with IGNORE;
    mask is true on real tokens (pad_id may be eos_id, so padding is told by length, not by id)."""
    T = max(len(x) for x, _, _ in items)
    tokens = torch.full((len(items), T), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(items), T), IGNORE, dtype=torch.long)  # (B, T)
    for i, (x, y, _) in enumerate(items):
        tokens[i, :len(x)] = torch.tensor(x)
        targets[i, :len(y)] = torch.tensor(y)
    mask = torch.arange(T) < torch.tensor([len(x) for x, _, _ in items])[:, None]  # (B, T)
    task = torch.tensor([t for _, _, t in items], dtype=torch.long)  # (B,)
    return dict(tokens=tokens, targets=targets, mask=mask, task=task)


# ----------------------------------------------------------------------------- task sampling

def _quotas(sizes: list[int], temperature: float) -> list[int]:
    """Examples per task in one epoch: shares proportional to n_t ** (1/T) of sum(n_t).

    Rounded by largest remainder so they sum exactly; at T = 1 they are the sizes themselves.
    """
    total = sum(sizes)
    weights = [n ** (1 / temperature) for n in sizes]
    raw = [total * w / sum(weights) for w in weights]
    quota = [int(r) for r in raw]
    largest_remainder_first = sorted(range(len(sizes)), key=lambda t: (quota[t] - raw[t], t))
    for t in largest_remainder_first[:total - sum(quota)]:
        quota[t] += 1
    return quota


class MixtureSampler:
    """Which examples one rank trains on in each epoch, with temperature-scaled task shares.

    An epoch has as many examples as the (capped) mixture. Task t gets a share proportional
    to n_t ** (1/T): T = 1 keeps natural proportions (every example once), larger T flattens
    them towards uniform. A task under its share is repeated in whole shuffled passes plus part
    of one more; a task over it gets a fresh random subset each epoch. The global epoch is the
    same on every rank (seeded by seed and epoch); rank r takes global[r::world_size] after
    trimming it to a multiple of world_size, so the shards are disjoint and cover it once.
    """

    def __init__(self, task_of: list[int], temperature: float = 1.0, cap: Optional[int] = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if cap is not None and cap < 1:
            raise ValueError(f"cap must be at least 1, got {cap}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in range for world_size {world_size}")
        self.seed, self.rank, self.world_size = seed, rank, world_size
        pools = {}
        for i, t in enumerate(task_of):
            pools.setdefault(t, []).append(i)
        rng = random.Random(f"cap/{seed}")  # the capped subset is fixed for the whole run
        self.pools = [p if cap is None or len(p) <= cap else rng.sample(p, cap)
                      for _, p in sorted(pools.items())]
        self.quota = _quotas([len(p) for p in self.pools], temperature)

    def __len__(self):
        return sum(self.quota) // self.world_size

    def epoch(self, epoch: int) -> list[int]:
        rng = random.Random(f"{self.seed}/{epoch}")
        order = []
        for pool, left in zip(self.pools, self.quota):
            while left > 0:  # sampling without replacement within each pass over the task
                order += rng.sample(pool, min(left, len(pool)))
                left -= len(pool)
        rng.shuffle(order)
        return order[:len(self) * self.world_size][self.rank::self.world_size]


def task_proportions(indices: list[int], task_of: list[int]) -> dict[int, float]:
    """Share of each task id among the sampled indices."""
    counts = Counter(task_of[i] for i in indices)
    return {t: counts[t] / len(indices) for t in sorted(counts)}


# ----------------------------------------------------------------------------- training a tokenizer

def train_tokenizer(texts: Iterable[str], path_prefix, vocab_size: int = 4096) -> Path:
    """Train a SentencePiece BPE model with LLaMA-like settings; returns "<path_prefix>.model"."""
    path = Path(f"{path_prefix}.model")
    path.parent.mkdir(parents=True, exist_ok=True)
    proto = io.BytesIO()
    spm.set_random_generator_seed(0)  # the input_sentence_size subsample; training is deterministic
    spm.SentencePieceTrainer.train(
        sentence_iterator=(t for t in texts if t), model_writer=proto,
        model_type="bpe", vocab_size=vocab_size,
        byte_fallback=True,  # any character still encodes, as UTF-8 bytes
        split_digits=True,  # numbers become digit sequences instead of arbitrary chunks
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,  # keep text as written
        max_sentence_length=1 << 16,  # long paragraphs are kept, not dropped
        input_sentence_size=200_000, shuffle_input_sentence=True,  # seconds, even for a big mixture
        num_threads=2, minloglevel=2)
    # Written under a temporary name, then renamed: a reader never sees half a file.
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(proto.getvalue())
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- checking a mixture

def main(argv=None):
    p = argparse.ArgumentParser(
        description="Check a task mixture (every bad record is reported) and print what was read: its files, "
                    "tasks and label counts (answers, where records have them).",
        epilog='one example per line (JSON Lines) or per element (a JSON array): {"task": ..., "instruction": ..., '
               '"input": ..., "output": ..., "choices": [...], "answer": ...} (task, choices, answer optional); '
               'the full format is in data.py\'s docstring')
    p.add_argument("mixture", nargs="?", default=None,
                   help="a mixture directory (train.jsonl, test.jsonl) or one file: .jsonl, or a .json array "
                        "(Alpaca, LLM-Adapters), gzipped or not (default: the built-in mixture, data/minicme)")
    args = p.parse_args(argv)
    train, test = load_mixture(args.mixture)
    for name, split in (("train", train), ("test", test)):
        # where: "path:line" or "path:line: record i"
        read = Counter((ex.where.split(": record ")[0].rpartition(":")[0], ": record " in ex.where) for ex in split)
        for (file, array), n in read.items():
            print(f"{name}: {n} examples from {file} ({'a JSON array' if array else 'JSON Lines'})")
    print(f"{len(train)} train / {len(test)} test examples")
    for task in sorted({ex.task for ex in train}):
        for name, split in (("train", train), ("test", test)):
            mine = [ex for ex in split if ex.task == task]
            labels = Counter(ex.output if ex.answer is None else ex.answer for ex in mine)
            if labels:
                top = ", ".join(f"{k} {v}" for k, v in labels.most_common(4))
                what = "answers" if any(ex.answer is not None for ex in mine) else "outputs"
                more = f" (+{len(labels) - 4} more {what})" if len(labels) > 4 else ""
                print(f"{task:>12} {name:>5} {sum(labels.values()):6d}: {top}{more}")


if __name__ == "__main__":
    try:  # common.cli's handling, without importing common.py (which imports this file)
        main()
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
    except (DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `python data.py | head`: the reader stopped early; end quietly, as common.cli does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a program a closed pipe ended
