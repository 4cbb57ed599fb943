"""`--base` as a Hugging Face Hub id, offline: a cache laid out as huggingface_hub lays it out
(models--org--name/refs/main -> snapshots/<commit>/...), read with HF_HUB_OFFLINE=1, and the one-line
errors for what can go wrong (unknown id, gated model, no network, no package)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model
from test_model import tiny, write_hf

ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
pytest.importorskip("huggingface_hub")


def fake_hub_cache(root: Path, repo_id: str, sp_tokenizer) -> Path:
    """A tiny Hugging Face-layout checkpoint where huggingface_hub's cache keeps repo_id's main revision."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = write_hf(tiny(vocab_size=sp_tokenizer.n_words), repo / "snapshots" / COMMIT, layout="sharded")
    (snapshot / "tokenizer.model").write_bytes(sp_tokenizer.path.read_bytes())
    return snapshot


def test_hub_id_loads_offline_from_the_cache(tmp_path, sp_tokenizer):
    snapshot = fake_hub_cache(tmp_path / "hub", "org/tiny-llama", sp_tokenizer)
    script = ("import model, torch; m = model.Transformer.from_pretrained('org/tiny-llama'); "
              "t = model.load_tokenizer('org/tiny-llama'); print(model.resolve_base('org/tiny-llama')); "
              "torch.save(m(torch.tensor([t.encode('hello', bos=True, eos=False)])), 'logits.pt')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"), "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert Path(res.stdout.strip()) == snapshot
    direct = model.Transformer.from_pretrained(snapshot)
    ids = model.load_tokenizer(snapshot).encode("hello", bos=True, eos=False)
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), direct(torch.tensor([ids])))


def test_local_directory_wins_and_bad_names_say_what_is_wrong(tmp_path):
    path = write_hf(tiny(), tmp_path / "org" / "name")
    assert model.resolve_base(path) == path
    with pytest.raises(model.CheckpointNotFound, match="no such checkpoint directory"):
        model.resolve_base(tmp_path / "missing")
    with pytest.raises(model.CheckpointNotFound, match="nor a Hub id"):
        model.resolve_base("just-a-name")


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download, raising what the real one raises."""

    def __init__(self, error):
        self.error = error

    def __call__(self, repo_id, allow_patterns=None, **kwargs):
        raise self.error


@pytest.mark.parametrize("name, message", [
    ("GatedRepoError", "gated on the Hugging Face Hub: accept its licence"),
    ("RepositoryNotFoundError", "no such model on the Hugging Face Hub"),
    ("LocalEntryNotFoundError", "cannot be reached"),
])
def test_hub_errors_are_one_clear_line(monkeypatch, name, message):
    import huggingface_hub
    from huggingface_hub import errors
    cls = getattr(errors, name)
    error = cls.__new__(cls)  # the HTTP errors' constructors want a live response; the type is what matters
    Exception.__init__(error, "401 Client Error\nmany lines of server detail")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(error))
    model._download.cache_clear()
    with pytest.raises(model.CheckpointError, match=message) as info:
        model.resolve_base("org/some-model")
    assert "\n" not in str(info.value)
    model._download.cache_clear()


def test_download_fetches_safetensors_and_only_the_loader_files(monkeypatch, tmp_path):
    calls = []

    def fake(repo_id, allow_patterns=None, **kwargs):
        calls.append(allow_patterns)
        (tmp_path / "model.safetensors").write_bytes(b"")
        return str(tmp_path)

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    model._download.cache_clear()
    assert model.resolve_base("org/safe") == tmp_path
    [patterns] = calls  # safetensors found: no second download of .bin files
    assert "model.safetensors" in patterns and "tokenizer.json" in patterns
    assert not any(p.endswith(".bin") for p in patterns)
    model._download.cache_clear()


def test_missing_package_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    model._download.cache_clear()
    with pytest.raises(model.CheckpointNotFound, match="pip install huggingface_hub"):
        model.resolve_base("org/anything")
    model._download.cache_clear()
