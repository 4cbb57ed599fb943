"""Run an entry point with a fault injected, for tests/test_faults.py:

    FAULT_KILL=1@3 python -m torch.distributed.run --nproc_per_node 2 tests/faults.py train.py ...

Faults, each an environment variable; AT is RANK@N: the process of that rank (as torchrun numbers
them, 0 without torchrun) as it draws its N-th micro-batch (data.collate; with --grad-accum 1 the
first micro-batch of the N-th step this process runs):
    FAULT_SLOW=SECONDS      every micro-batch takes that much longer, so a signal sent from
                            outside lands mid-run
    FAULT_SIGNAL=NAME:AT    that process sends itself the signal (SIGTERM, SIGUSR1)
    FAULT_KILL=AT           that process dies of SIGKILL, mid-step
    FAULT_SAVE_SIGNAL=NAME  each checkpoint write gets the signal while under way (between
                            adapters.safetensors and checkpoint.pt)
The entry point runs as `python ENTRY ARGS` would run it (as __main__).
"""
import os
import runpy
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402

RANK = int(os.environ.get("RANK", 0))
drawn = []


def at(spec):
    rank, n = spec.split("@")
    return int(rank) == RANK and len(drawn) == int(n)


def collate(items, pad_id, _collate=data.collate):
    drawn.append(len(items))
    time.sleep(float(os.environ.get("FAULT_SLOW", 0)))
    if "FAULT_SIGNAL" in os.environ:
        name, spec = os.environ["FAULT_SIGNAL"].split(":")
        if at(spec):
            os.kill(os.getpid(), getattr(signal, name))
    if "FAULT_KILL" in os.environ and at(os.environ["FAULT_KILL"]):
        os.kill(os.getpid(), signal.SIGKILL)
    return _collate(items, pad_id)


def save(obj, f, _save=torch.save, **kwargs):
    os.kill(os.getpid(), getattr(signal, os.environ["FAULT_SAVE_SIGNAL"]))
    return _save(obj, f, **kwargs)


data.collate = collate
if "FAULT_SAVE_SIGNAL" in os.environ:
    torch.save = save
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
