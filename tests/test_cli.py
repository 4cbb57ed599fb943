"""A new user's mistakes at the command line (issue 25): each flag's rule is checked before any data,
base or tiny base is read or built, and a mistake ends in one `error:` line naming the flag, exit
status 2, no traceback, nothing written. Also: --targets by either naming, --resume with the run's
own flags, the mixture found again from elsewhere, --compare counting a run once, export replacing
a former export whole, file modes, and quiet broken pipes.

    python -m pytest -q tests/test_cli.py
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from test_train import Crash, adapters, flags, log, setup  # noqa: F401  (setup: the tiny random base fixture)

import bench
import bench_peer
import common
import data
import eval as evaluation
import export
import model as model_py
import pretrain
import runs
import train
from model import ModelArgs, Transformer

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def refused(capsys, main, argv, named):
    """main(argv) under common.cli ends in exit status 2 with one `error:` line naming `named`."""
    with pytest.raises(SystemExit) as e:
        common.cli(main, argv)
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert "error: " in last and named in last, err  # argparse prints its usage above the line
    assert sum("error:" in line for line in err.splitlines()) == 1, err
    return last


@pytest.fixture
def nothing_built(monkeypatch):
    """Reading the data, pretraining the tiny base or loading weights fails the test: the checks come first."""
    def forbidden(*a, **k):
        raise AssertionError("expensive work before the flags were checked")

    monkeypatch.setattr(data, "load_mixture", forbidden)
    monkeypatch.setattr(pretrain, "tiny_base", forbidden)
    monkeypatch.setattr(Transformer, "from_pretrained", forbidden)


TRAIN_MISTAKES = [
    (["--clip", "-1"], "--clip -1.0: must be 0 (off) or positive"), (["--alpha", "0"], "--alpha 0.0: must be positive"),
    (["--warmup", "2"], "--warmup 2.0: must be a fraction"), (["--warmup", "-0.1"], "--warmup"),
    (["--epochs", "0"], "--epochs 0.0: must be positive"), (["--weight-decay", "-1"], "--weight-decay"),
    (["--balance", "-0.1"], "--balance"), (["--timeout", "0"], "--timeout 0.0: must be positive"),
    (["--lr", "-1"], "--lr -1.0: must be positive"), (["--lr", "nan"], "--lr nan: must be a finite number"),
    (["--dropout", "1.5"], "--dropout 1.5: must be a probability"), (["--rank", "0"], "--rank 0"),
    (["--pretrain-steps", "0"], "--pretrain-steps 0"), (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--targets", "w1,w2,w3,typo"], "typo: not a linear layer"), (["--targets", ","], "--targets"),
    (["--base", "tiny", "--targets", "nosuch"], "nosuch: not a linear layer"),
    (["--targets", "output"], "--targets output: teamlora routes every token"),
    (["--method", "hydralora", "--targets", "lm_head"], "--targets output: hydralora"),
]


@pytest.mark.parametrize("argv, named", TRAIN_MISTAKES, ids=[" ".join(a) for a, _ in TRAIN_MISTAKES])
def test_train_flags_are_refused_before_any_work(setup, tmp_path, capsys, nothing_built, argv, named):  # noqa: F811
    refused(capsys, train.main, flags(setup, tmp_path / "run", *argv), named)
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this torch has a GPU")
def test_cuda_on_a_cpu_only_torch_is_one_line(tmp_path, capsys, nothing_built):
    refused(capsys, train.main, ["--device", "cuda", "--out", str(tmp_path / "run")], "--device cuda")
    refused(capsys, evaluation.main, ["--ckpt", str(tmp_path), "--device", "cuda"], "--device cuda")


def test_out_naming_a_file_is_refused(tmp_path, capsys, nothing_built):
    (tmp_path / "file").write_text("mine")
    refused(capsys, train.main, ["--out", str(tmp_path / "file")], "--out")
    assert (tmp_path / "file").read_text() == "mine"


def test_targets_take_meta_and_hugging_face_names_on_any_base():
    """model.py's linear layers are the table's, whatever the checkpoint's layout; a partly Hugging Face
    list adapts every layer it names (it used to fall back silently to the FFN)."""
    model = Transformer(ModelArgs(dim=8, n_layers=1, n_heads=2, vocab_size=16, hidden_dim=8))
    assert set(train.HF_NAMES) == {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    args = train.get_args(["--targets", "w1,w2,w3,q_proj,k_proj,v_proj,o_proj"])
    assert args.targets == ["w1", "w2", "w3", "q_proj", "k_proj", "v_proj", "o_proj"]  # the config as parsed
    assert train.adapter_kwargs(args)["targets"] == ["w1", "w2", "w3", "wq", "wk", "wv", "wo"]
    assert train.adapter_kwargs(train.get_args([]))["targets"] == ["w1", "w2", "w3"]  # the default, both namings
    assert train.adapter_kwargs(train.get_args(["--method", "lora", "--targets", "lm_head"]))["targets"] == ["output"]


def test_lora_on_the_output_layer_trains(setup, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    train.main(flags(setup, out, "--method", "lora", "--targets", "output", "--max-steps", "1", "--batch-size", "2",
                     "--no-eval"))
    assert {k.split(".")[0] for k in adapters(out)} == {"output"}


EVAL_MISTAKES = [(["--max-new-tokens", "0"], "--max-new-tokens 0: must be at least 1"),
                 (["--batch-size", "0"], "--batch-size 0: must be at least 1"), (["--limit", "-1"], "--limit -1"),
                 (["--device", "tpu"], "--device 'tpu'")]


@pytest.mark.parametrize("argv, named", EVAL_MISTAKES, ids=[" ".join(a) for a, _ in EVAL_MISTAKES])
def test_eval_flags_are_refused_before_the_run_is_read(tmp_path, capsys, argv, named):
    refused(capsys, evaluation.main, ["--ckpt", str(tmp_path / "no-run"), *argv], named)


def test_export_naming_a_file_or_a_foreign_directory_is_refused_untouched(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    refused(capsys, evaluation.main, ["--ckpt", str(tmp_path / "no-run"), "--export", str(tmp_path / "file")],
            "--export")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")  # an export's name, but no export here
    refused(capsys, evaluation.main, ["--ckpt", str(tmp_path / "no-run"), "--export", str(mine)], "not an export")
    assert [f.name for f in mine.iterdir()] == ["README.md"] and (mine / "README.md").read_text() == "my notes"


def test_export_replaces_a_former_export_whole_and_files_are_0644(setup, tmp_path):  # noqa: F811
    out, exported = tmp_path / "run", tmp_path / "exported"
    train.main(flags(setup, out, "--method", "lora", "--max-steps", "1", "--batch-size", "2", "--no-eval"))
    evaluation.main(["--ckpt", str(out), "--export", str(exported)])
    assert (exported / "adapter_config.json").exists()  # PEFT's
    shutil.copy(out / "checkpoint.pt", tmp_path / "lora.pt")
    train.main(flags(setup, out, "--max-steps", "1", "--batch-size", "2", "--no-eval", "--overwrite"))  # teamlora
    evaluation.main(["--ckpt", str(out), "--export", str(exported)])
    assert sorted(f.name for f in exported.iterdir()) == ["README.md", "adapter_model.safetensors",
                                                          "teamlora_config.json"]  # no stale adapter_config.json
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith("exported")] == ["exported"]
    umask = os.umask(0)
    os.umask(umask)
    for f in [out / "adapters.safetensors", out / "checkpoint.pt", exported / "adapter_model.safetensors"]:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f


def test_resume_takes_the_runs_own_flags(setup, tmp_path, monkeypatch):  # noqa: F811
    """A run cut after its step-1 checkpoint continues with `--out OUT --resume` alone, where every
    training flag had to be repeated before; a flag given that differs is still refused."""
    out = tmp_path / "cut"
    argv = flags(setup, out, "--max-steps", "2", "--save-every", "1", "--batch-size", "2", "--rank", "3", "--no-eval")
    save = runs.save

    def save_then_die(*a, **k):
        save(*a, **k)
        raise Crash

    monkeypatch.setattr(runs, "save", save_then_die)
    with pytest.raises(Crash):
        train.main(argv)
    monkeypatch.setattr(runs, "save", save)
    train.main(["--out", str(out), "--resume"])
    assert [r["step"] for r in log(out)] == [1, 2]
    config, given = torch.load(out / "checkpoint.pt", weights_only=True)["config"], vars(train.get_args(argv))
    training = [k for k in given if k not in common.RUN_ONLY]  # the others are this command's (no_eval: False)
    assert [config[k] for k in training] == [given[k] for k in training] and config["no_eval"] is False
    with pytest.raises(common.UserError, match=r"--rank 3 \(now 4\)"):
        train.main(["--out", str(out), "--resume", "--rank", "4"])


def test_a_run_that_never_checkpointed_says_overwrite(setup, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "started"
    out.mkdir()
    (out / "log.jsonl").write_text("")  # died before its first checkpoint
    for extra in (["--resume"], []):
        line = refused(capsys, train.main, flags(setup, out, "--max-steps", "1", *extra), "before its first checkpoint")
        assert "--overwrite starts it again" in line
    refused(capsys, train.main, ["--out", str(tmp_path / "empty"), "--resume"], "start without --resume")


def test_the_mixture_is_stored_absolute_and_read_again_from_elsewhere(setup, tmp_path, monkeypatch):  # noqa: F811
    """A relative --data is stored as given and as an absolute path: eval.py from another directory,
    where the same relative name is another mixture, reads the one the run trained on."""
    base, mix = setup
    here, there = tmp_path / "here", tmp_path / "there"
    shutil.copytree(mix, here / "mix")
    (there / "mix").mkdir(parents=True)
    other = [json.dumps({"task": "other", "instruction": "Say x.", "input": "", "output": "x"})] * 4
    for split in ("train", "test"):
        (there / "mix" / f"{split}.jsonl").write_text("\n".join(other) + "\n")
    monkeypatch.chdir(here)
    train.main(flags((base, Path("mix")), tmp_path / "run", "--max-steps", "1", "--batch-size", "2", "--no-eval"))
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["data"] == "mix" and ckpt["data_path"] == str(here / "mix")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data_path"] == str(here / "mix")
    monkeypatch.chdir(there)
    evaluation.main(["--ckpt", str(tmp_path / "run"), "--limit", "1", "--max-new-tokens", "1"])
    results = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert set(results["tasks"]) == {"color", "copy"} and results["data"] == "mix"


def test_compare_counts_a_run_once(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"config": {"method": "lora", "seed": 0}, "train_time_s": 12.345678}))
    (run / "eval.json").write_text(json.dumps({"tasks": {"spam": {"n": 1, "accuracy": 1.0}}, "average": 1.0}))
    shutil.copytree(run, tmp_path / "copy")
    refused(capsys, evaluation.main, ["--compare", str(run), str(tmp_path / "run")], "are one directory")
    refused(capsys, evaluation.main, ["--compare", str(run), str(tmp_path / "copy")], "copies of one run")
    with pytest.raises(SystemExit):
        evaluation.main(["--help"])
    assert "differ only in --seed grouped" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("main, argv, named", [
    (bench.main, ["--repeats", "0"], "--repeats 0"), (bench.main, ["--experts", "0"], "--experts 0"),
    (bench.main, ["--rank", "0"], "--rank 0"), (bench.main, ["--dim", "10", "--heads", "4"], "--heads 4"),
    (bench_peer.main, ["--base", "nowhere"], "--base nowhere"), (bench_peer.main, ["--base", ".", "--answer", "0"],
                                                                 "--answer 0"),
    (model_py.main, ["nowhere", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (pretrain.main, ["--device", "tpu"], "--device 'tpu'")], ids=lambda x: x if isinstance(x, str) else None)
def test_the_other_entry_points_check_their_flags_first(capsys, main, argv, named):
    refused(capsys, main, argv, named)


def cmd(*args, **kw):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, **kw)


def test_in_a_fresh_process_a_mistake_is_one_line_and_bench_peer_help_needs_no_peft():
    res = cmd("train.py", "--clip", "-1")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1] == "train.py: error: --clip -1.0: must be 0 (off) or positive: the " \
                                                  "largest gradient norm"
    res = cmd("bench_peer.py", "--help")
    assert res.returncode == 0 and "usage: bench_peer.py" in res.stdout, res.stderr


def test_a_reader_that_stops_early_ends_the_output_quietly(setup):  # noqa: F811
    """`python data.py MIX | head -0`: the output meets a closed pipe."""
    proc = subprocess.Popen([sys.executable, "data.py", str(setup[1])], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", err


def test_resume_finds_a_moved_base_by_base(setup, tmp_path, capsys):  # noqa: F811
    """--base may say where the base is now once the stored directory is gone; while it is there, another
    --base is another run's base and refused."""
    base = tmp_path / "base"
    shutil.copytree(setup[0], base)
    out = tmp_path / "run"
    train.main(flags((base, setup[1]), out, "--max-steps", "1", "--batch-size", "2", "--no-eval"))
    capsys.readouterr()
    refused(capsys, train.main, ["--out", str(out), "--resume", "--base", str(setup[0])], "--base")
    base.rename(tmp_path / "moved")
    refused(capsys, train.main, ["--out", str(out), "--resume"], str(base))  # gone: one line naming it
    train.main(["--out", str(out), "--resume", "--base", str(tmp_path / "moved")])
    assert "finished its 1 steps already" in capsys.readouterr().out



def test_resume_onto_a_base_of_another_shape_is_one_line(setup, tmp_path, capsys):  # noqa: F811
    """The run's base gone and --base naming one of another shape: one line naming the mismatch."""
    base, other = tmp_path / "base", tmp_path / "other"
    shutil.copytree(setup[0], base)
    shutil.copytree(setup[0], other)
    Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=model_py.load_tokenizer(other).n_words,
                          hidden_dim=64, max_seq_len=128)).save_pretrained(other)  # FFN 64 wide, not 48
    out = tmp_path / "run"
    train.main(flags((base, setup[1]), out, "--max-steps", "1", "--batch-size", "2", "--no-eval"))
    capsys.readouterr()
    shutil.rmtree(base)
    refused(capsys, train.main, ["--out", str(out), "--resume", "--base", str(other)], "do not fit this base")
