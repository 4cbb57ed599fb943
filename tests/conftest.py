import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pytest  # noqa: E402
import torch  # noqa: E402

import data  # noqa: E402
from model import Tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def builtin_mixture():
    return data.load_mixture()


@pytest.fixture(scope="session")
def sp_tokenizer(builtin_mixture, tmp_path_factory):
    """Trained in-process on 400 built-in examples (100 per task: the file is grouped by task)."""
    sample = builtin_mixture[0][::40]
    texts = [f"{ex.instruction}\n{ex.input}" for ex in sample] + [ex.output for ex in sample]
    return Tokenizer(data.train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "sp", vocab_size=512))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning OpenMP threads crawl on a busy 2-core machine.
    A test module opts in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
