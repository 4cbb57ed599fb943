"""Long runs on shared clusters (issue 23), on a CPU with gloo: a scheduler's SIGTERM to a real
train.py process, a rank killed mid-step in a 2-rank run, a loss that turns non-finite, a write
that fails, and a run that comes back on another number of processes. Each asserts the exit
status, the one line and that the checkpoint left on disk loads and resumes. tests/faults.py
injects the faults into subprocesses."""
import errno
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common
import data
import runs
import train
from test_train import ROOT, adapters, flags, log, setup  # noqa: F401 (setup: the fixture)


def launch(args, nproc=None, **faults):
    """train.py through tests/faults.py (under torchrun with nproc, each rank's output in OUT's
    sibling torchrun/), started and not waited for."""
    cmd = [sys.executable, "tests/faults.py", "train.py", *args]
    if nproc:
        logs = Path(args[args.index("--out") + 1]).with_name("torchrun")
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--redirects", "3",
                    "--log-dir", str(logs)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **faults}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_line(err):
    """The last line written to stderr (tqdm's bar redraws with carriage returns)."""
    return err.replace("\r", "\n").strip().splitlines()[-1]


def no_leftovers(out):
    assert not list(Path(out).glob("*.tmp")), list(Path(out).glob("*.tmp"))


@pytest.fixture
def stop_signals():
    """common.catch_stop_signals in this process for one test; the handlers and state as before after."""
    before = {s: signal.getsignal(s) for s in common.STOP_SIGNALS}
    common.catch_stop_signals()
    yield
    for s, handler in before.items():
        signal.signal(s, handler)
    common.stop_signal.clear()


def at_micro_batch(monkeypatch, action):
    """action(n) as the run draws its n-th micro-batch (n from 1; with --grad-accum 1, step n)."""
    calls, collate = [], data.collate

    def counting(items, pad_id):
        calls.append(1)
        action(len(calls))
        return collate(items, pad_id)

    monkeypatch.setattr(data, "collate", counting)


def test_sigterm_mid_run_saves_that_step_and_resume_is_bit_exact(setup, tmp_path):
    """SIGTERM from outside while the run trains: it finishes its step, saves it (a second SIGTERM
    arrives while the checkpoint is written), prints the command that continues, exits 3. The
    command, run, ends with exactly the adapters and losses of an uninterrupted run."""
    args = ["--max-steps", "10", "--save-every", "0", "--batch-size", "3", "--dropout", "0.1", "--no-eval"]
    out = tmp_path / "cut"
    proc = launch(flags(setup, out, *args), FAULT_SLOW="0.3", FAULT_SAVE_SIGNAL="SIGTERM")
    deadline = time.time() + 120
    while not (out / "log.jsonl").exists() or len(log(out)) < 2:  # records reach the disk step by step
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    logged = len(log(out))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3 and "Traceback" not in err, err
    step = common.read_checkpoint(out)["step"]
    assert logged < step <= logged + 2 < 10  # the step under way (or the next, if the signal beat its log line)
    assert len(log(out)) == step
    no_leftovers(out)
    said, command = last_line(err).split("; continue with: ")
    assert said == f"stopped on SIGTERM after step {step}, saved in {out}"
    python, script, *argv = shlex.split(command)
    assert (python, script, argv) == ("python", "train.py", flags(setup, out, *args) + ["--resume"])
    train.main(argv)
    train.main(flags(setup, tmp_path / "whole", *args))
    whole, cut = adapters(tmp_path / "whole"), adapters(out)
    assert all(torch.equal(whole[k], cut[k]) for k in whole)
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(tmp_path / "whole")]


def test_an_absurd_lr_stops_at_the_first_non_finite_step(setup, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        common.cli(train.main, flags(setup, out, "--lr", "1e12", "--max-steps", "8", "--save-every", "1",
                                     "--batch-size", "2", "--warmup", "0", "--no-eval"))
    assert e.value.code == 4
    err = capsys.readouterr().err
    records = log(out)
    bad = len(records) + 1
    assert bad < 8 and last_line(err).startswith(f"error: step {bad}: the ") and "is not finite" in last_line(err)
    assert "Traceback" not in err and err.count("error:") == 1
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    ckpt = common.read_checkpoint(out)  # the last finite step's, untouched by the bad one
    assert ckpt["step"] == bad - 1 and all(torch.isfinite(t).all() for t in ckpt["tensors"].values())


def test_skip_nonfinite_skips_the_update_and_counts(setup, tmp_path, monkeypatch, capsys):
    """Task copy's loss made infinite at chosen steps: --skip-nonfinite 1 skips the first (no
    update, the step and its examples still count), the second stops the run naming task copy;
    a resume with a larger budget skips it too and finishes."""
    copy = 1  # the tasks are sorted: color, copy
    bad_steps, step = [2, 4], [0]
    token_losses = train.token_losses

    def losses(model, batch):
        step[0] += 1
        x = token_losses(model, batch)
        hit = (batch["task"] == copy)[:, None] & (batch["targets"] != data.IGNORE)
        return x.masked_fill(hit, math.inf) if step[0] in bad_steps and hit.any() else x

    monkeypatch.setattr(train, "token_losses", losses)
    out = tmp_path / "run"
    argv = flags(setup, out, "--max-steps", "5", "--save-every", "1", "--batch-size", "4", "--no-eval")
    with pytest.raises(SystemExit) as e:
        common.cli(train.main, argv + ["--skip-nonfinite", "1"])
    assert e.value.code == 4
    assert last_line(capsys.readouterr().err).startswith(
        f"error: step 4: the loss of task copy is not finite; stopped before its update, {out} keeps its last "
        "checkpoint (1 skipped already; ")
    assert [(r["step"], r["skipped"], r["loss"] is None) for r in log(out)] == [(1, 0, False), (2, 1, True), (3, 1, False)]
    ckpt = common.read_checkpoint(out)
    assert (ckpt["step"], ckpt["skipped"], ckpt["data"]["examples_seen"]) == (3, 1, 12)
    assert float(ckpt["optimizer"]["state"][0]["step"]) == 2 and ckpt["scheduler"]["last_epoch"] == 3  # none at 2
    step[:], bad_steps[:] = [3], [4]
    train.main(argv + ["--skip-nonfinite", "2", "--resume"])
    assert [r["skipped"] for r in log(out)] == [0, 1, 1, 2, 2]
    ckpt = common.read_checkpoint(out)
    assert (ckpt["step"], ckpt["skipped"], float(ckpt["optimizer"]["state"][0]["step"])) == (5, 2, 3)


@pytest.fixture(scope="module")
def uninterrupted(setup, tmp_path_factory):
    """6 steps on 1 process x 4 examples, without dropout: what a run moved between world sizes matches."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train.main(flags(setup, out, *MOVING, "--batch-size", "4"))
    return out


MOVING = ["--max-steps", "6", "--save-every", "3", "--dropout", "0", "--no-eval", "--timeout", "1"]


def test_a_run_moves_1_2_1_processes_through_a_preemption_and_a_dead_rank(setup, uninterrupted, tmp_path,
                                                                          monkeypatch, stop_signals, capsys):
    """1 process x 4 examples, SIGUSR1 at step 2; resumed on 2 processes x 2, whose rank 1 dies of
    SIGKILL in step 4: rank 0 says so in one line and exits 5, its step-3 checkpoint intact; resumed
    on 1 process x 4 to the end. Every step's loss is the uninterrupted run's: each global step took
    the same examples (the order of float sums aside), whatever the number of processes."""
    out = tmp_path / "run"
    at_micro_batch(monkeypatch, lambda n: n == 2 and os.kill(os.getpid(), signal.SIGUSR1))
    with pytest.raises(SystemExit) as e:
        common.cli(train.main, flags(setup, out, *MOVING, "--batch-size", "4"))
    assert e.value.code == 3
    assert last_line(capsys.readouterr().err).startswith(f"stopped on SIGUSR1 after step 2, saved in {out}; ")
    monkeypatch.undo()

    began = time.time()
    proc = launch(flags(setup, out, *MOVING, "--batch-size", "2", "--resume"), nproc=2, FAULT_KILL="1@2")
    _, report = proc.communicate(timeout=120)
    assert proc.returncode == 1 and time.time() - began < 60  # torchrun's status for a failed worker
    (rank0_err,) = tmp_path.glob("torchrun/*/attempt_0/0/stderr.log")
    (rank0_out,) = tmp_path.glob("torchrun/*/attempt_0/0/stdout.log")
    err = rank0_err.read_text()
    assert "Traceback" not in err and err.count("error:") == 1, err
    assert last_line(err).startswith("error: rank 0 of 2: a collective failed (") and "--timeout 1 min" in err
    assert "resuming" in rank0_out.read_text() and "not exact: each rank's dropout stream" in rank0_out.read_text()
    assert re.search(r"rank\s*: 0 \(local_rank: 0\)\n\s*exitcode\s*: 5 ", report), report  # its report
    assert common.read_checkpoint(out)["step"] == 3 and len(log(out)) == 3
    no_leftovers(out)

    train.main(flags(setup, out, *MOVING, "--batch-size", "4", "--resume"))
    assert "on 1 process x 4 examples" in capsys.readouterr().out
    whole = log(uninterrupted)
    assert [r["loss"] for r in log(out)] == pytest.approx([r["loss"] for r in whole], rel=1e-5)
    a, b = adapters(uninterrupted), adapters(out)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_the_data_position_is_global():
    """example_stream and advance, on a mixture of odd size (11): a resume on the same number of
    ranks continues each rank's stream exactly, across epochs; on another number, each later
    global step takes the examples the uninterrupted run takes, to the end of the epoch (where
    the epoch's cut to a multiple of the world size may differ); a checkpoint of the format
    before (a per-rank count) goes on where it stood."""
    sampler = data.MixtureSampler([0] * 7 + [1] * 4, seed=3)
    size = len(sampler)

    def steps(position, world, per_rank, n):  # n global steps: the examples each takes, all ranks together
        streams = [runs.example_stream(sampler, position, r, world) for r in range(world)]
        return [sorted(x for s in streams for x in (next(s) for _ in range(per_rank))) for _ in range(n)]

    for world, per_rank in ((1, 2), (2, 1), (2, 2)):
        whole = steps(runs.START, world, per_rank, 9)  # about three epochs
        for k in range(9):
            there = runs.advance(runs.START, k * world * per_rank, size, world)
            assert steps(there, world, per_rank, 9 - k) == whole[k:], (world, per_rank, k)
    legacy = {"step": 3, "rng": [{}, {}], "config": {"batch_size": 2, "grad_accum": 1}, "data": {"examples_seen": 6}}
    for rank in range(2):  # a checkpoint of the format before: each rank went on from step x its own batch
        shard = data.MixtureSampler([0] * 7 + [1] * 4, seed=3, rank=rank, world_size=2)
        before = [i for e in range(3) for i in shard.epoch(e)][6:]  # as train.py's batches took them then
        now = runs.example_stream(sampler, runs.data_position(legacy, size), rank, 2)
        assert [next(now) for _ in before] == before
    whole = steps(runs.START, 2, 2, 2)  # one process now takes what two took, and the reverse
    assert steps(runs.advance(runs.START, 4, size, 2), 1, 4, 1) == whole[1:]
    assert steps(runs.advance(runs.START, 4, size, 1), 2, 2, 1) == steps(runs.START, 1, 4, 2)[1:]


def test_each_log_record_is_on_disk_before_the_next_step(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = []
    at_micro_batch(monkeypatch, lambda n: seen.append(len((out / "log.jsonl").read_text().splitlines())))
    train.main(flags(setup, out, "--max-steps", "3", "--batch-size", "2", "--no-eval"))
    assert seen == [0, 1, 2]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) for a real ENOSPC")
def test_a_checkpoint_write_that_finds_the_disk_full_stops_and_keeps_the_last(setup, tmp_path, monkeypatch, capsys):
    """checkpoint.pt.tmp made a link to /dev/full during step 3: step 4's checkpoint write fails
    with ENOSPC, as on a full disk. One line naming the file, exit 6, no temporary file left, and
    the step-2 pair loads and resumes."""
    out = tmp_path / "run"
    argv = flags(setup, out, "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--no-eval")
    at_micro_batch(monkeypatch, lambda n: n == 3 and (out / "checkpoint.pt.tmp").symlink_to("/dev/full"))
    with pytest.raises(SystemExit) as e:
        common.cli(train.main, argv)
    assert e.value.code == 6
    assert last_line(capsys.readouterr().err) == (f"error: cannot write {out / 'checkpoint.pt'}: "
                                                  f"{os.strerror(errno.ENOSPC)}; nothing in {out} is half-written")
    no_leftovers(out)
    assert common.read_checkpoint(out)["step"] == 2
    monkeypatch.undo()
    train.main(argv + ["--resume"])
    assert [r["step"] for r in log(out)] == [1, 2, 3, 4] and common.read_checkpoint(out)["step"] == 4


def test_a_log_write_that_fails_is_one_line(setup, tmp_path, monkeypatch, capsys):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full (Linux) for a real ENOSPC")
    monkeypatch.setattr(runs, "open_log", lambda out, step: open("/dev/full", "a", buffering=1))
    with pytest.raises(SystemExit) as e:
        common.cli(train.main, flags(setup, tmp_path / "run", "--max-steps", "2", "--batch-size", "2", "--no-eval"))
    assert e.value.code == 6
    assert last_line(capsys.readouterr().err).startswith(f"error: cannot write /dev/full: {os.strerror(errno.ENOSPC)}")


def test_a_rename_refused_keeps_the_previous_pair(tmp_path, monkeypatch):
    state = lambda step: {"step": step, "adapter": {"method": "lora"}, "config": {}}  # noqa: E731
    common.save_checkpoint(tmp_path, {"lora_A": torch.zeros(2)}, state(1))

    def refuse(a, b):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(b))

    monkeypatch.setattr(common.os, "replace", refuse)
    with pytest.raises(common.WriteFailed, match=f"cannot write {tmp_path / 'adapters.safetensors'}: Permission"):
        common.save_checkpoint(tmp_path, {"lora_A": torch.ones(2)}, state(2))
    monkeypatch.undo()
    no_leftovers(tmp_path)
    ckpt = common.read_checkpoint(tmp_path)
    assert ckpt["step"] == 1 and torch.equal(ckpt["tensors"]["lora_A"], torch.zeros(2))
