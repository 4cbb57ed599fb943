"""Run an entry point with CUDA's placement rules checked on a CPU:

    python -m torch.distributed.run --nproc_per_node 2 tests/placement.py train.py --method lora ...

On a GPU, a tensor made without device= (torch.zeros(()), torch.tensor(...), torch.get_rng_state())
lives on the CPU while the model lives on the GPU; nccl then refuses it and most ops refuse to mix
it with GPU tensors. On a CPU machine both are the same device, so such faults stay hidden. Here a
TorchFunctionMode follows every tensor as a GPU run would place it: "host" if made by a factory
without device=, by .cpu() or from host tensors only; "device" if made with device=, by .to(a
device), from any device tensor, or a parameter (Module.to moves those). Every collective then
asserts that its tensors are device tensors, and an op mixing a host tensor of one or more
dimensions with device tensors fails as it would on a GPU (indexing excepted: CUDA allows a CPU
index). Why not simpler: torch.set_default_device('meta') breaks AdamW's CPU step counters and all
host-side data, and a model on 'meta' cannot be read back (.item()) to log a loss. Blind spot: the
training device here is the CPU, so a hard-coded .to("cpu") counts as the training device.
"""
import runpy
import sys
import weakref
from pathlib import Path

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

ROOT = Path(__file__).resolve().parent.parent


class Placement(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.host = {}  # id(tensor) -> its finalizer, for the tensors a GPU run would hold on the CPU

    def is_host(self, t):
        return id(t) in self.host and not isinstance(t, torch.nn.Parameter)

    def place(self, t, host):
        if host and id(t) not in self.host:
            self.host[id(t)] = weakref.finalize(t, self.host.pop, id(t), None)
        elif not host and id(t) in self.host:
            self.host.pop(id(t)).detach()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        leaves = tree_leaves((args, kwargs))
        tensors = [t for t in leaves if isinstance(t, torch.Tensor)]
        moved = any(isinstance(x, (torch.device, str)) for x in leaves[1:]) or kwargs.get("device") is not None
        host_in = [t for t in tensors if self.is_host(t)]
        if name == "cpu":
            host = True
        elif name in ("to", "cuda") and (moved or name == "cuda"):
            host = False
        elif name == "to" and len(tensors) == 2:  # x.to(other): other's place
            host = self.is_host(tensors[1])
        elif not tensors or name.endswith("_like") and moved:
            host = not moved
        else:
            if host_in and len(host_in) < len(tensors) and any(t.dim() > 0 for t in host_in) \
                    and name not in ("__getitem__", "__setitem__"):
                raise RuntimeError(f"{name}: a tensor a GPU run holds on the CPU, shape {tuple(host_in[0].shape)}, "
                                   f"meets tensors on the training device")
            host = len(host_in) == len(tensors)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.place(t, host)
        return out


def install(mode):
    """Wrap every collective to check its tensors; torch.get_rng_state's state is a CPU tensor."""
    def checked(name, collective):
        def run(*args, **kwargs):
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, torch.Tensor) and mode.is_host(t):
                    raise AssertionError(f"dist.{name} got a tensor a GPU run holds on the CPU "
                                         f"(shape {tuple(t.shape)}): nccl cannot reduce it")
            return collective(*args, **kwargs)
        return run

    for name in ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
                 "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single"):
        setattr(dist, name, checked(name, getattr(dist, name)))
    get_rng_state = torch.get_rng_state

    def host_rng_state():
        state = get_rng_state()
        mode.place(state, True)
        return state
    torch.get_rng_state = host_rng_state


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    mode = Placement()
    install(mode)
    with mode:
        runpy.run_path(str(ROOT / script), run_name="__main__")
