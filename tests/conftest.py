import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import sentencepiece as spm  # noqa: E402

import data  # noqa: E402


class SPTokenizer:
    """A tiny stand-in with model.py Tokenizer's interface, so data tests do not need model.py."""

    def __init__(self, path):
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.n_words = self.sp.vocab_size()

    def encode(self, text, bos, eos):
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids):
        return self.sp.decode(ids)


@pytest.fixture(scope="session")
def builtin_mixture():
    return data.load_mixture()


@pytest.fixture(scope="session")
def sp_tokenizer(builtin_mixture, tmp_path_factory):
    """Trained in-process on 400 built-in examples (100 per task: the file is grouped by task)."""
    sample = builtin_mixture[0][::40]
    texts = [f"{ex.instruction}\n{ex.input}" for ex in sample] + [ex.output for ex in sample]
    return SPTokenizer(data.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "sp", vocab_size=512))
