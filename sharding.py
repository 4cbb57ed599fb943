"""FSDP2 for train.py --fsdp: PyTorch's own `fully_shard`, for a model DDP cannot hold on one GPU.

    torchrun --nproc_per_node 8 train.py --fsdp --method full --base /ckpt/Llama-2-7b-hf

Each transformer block, then the root (embeddings, final norm, output layer), becomes one FSDP
unit: its parameters, gradients and optimizer state live in 1/world shards (dim 0 of every
tensor), and a block's full weights exist only while it runs (all-gathered, freed after).
build() never holds the whole model on one device: the model is built on the meta device,
sharded, then every rank reads the base one tensor at a time and keeps its own rows.
Checkpoints keep the project's format (common.py): gather() hands rank 0 the full tensors.
"""
import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

import teamlora
from model import Transformer, checkpoint_tensors


def is_sharded(model):
    return isinstance(model, FSDPModule)


def shard(model, param_dtype=None):
    """fully_shard each block, then the root. param_dtype: the dtype blocks compute in (bf16 for
    --method full on GPUs: all-gathered from the float32 master shards); gradients are reduced in
    float32 either way."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def _local(t, like):
    """This rank's part of the full tensor t, placed as the sharded parameter `like` is. Every rank
    holds t (read from the same file), so no data moves between ranks (src_data_rank=None)."""
    return distribute_tensor(t.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def _attach_on_meta(model, attach, device):
    """attach(model) on a model built on the meta device, with adapters drawn as on a loaded one:
    add_adapters allocates them on the wrapped weight's device, so while it runs each linear's meta
    weight is stood in for by one element on `device` viewed at the weight's shape. Returns
    attach's result; the stand-ins are meta again afterwards."""
    linears = [m for m in model.modules() if type(m) is nn.Linear]
    for m in linears:
        m.weight = nn.Parameter(torch.empty(1, device=device).expand(m.weight.shape), requires_grad=False)
    adapter = attach(model)
    for m in model.modules():
        if isinstance(m, nn.Linear) and not m.weight.is_meta:
            m.weight = nn.Parameter(torch.empty(m.weight.shape, device="meta"), requires_grad=False)
    if model.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    teamlora.mark_only_adapters_trainable(model) if adapter is not None else model.requires_grad_(True)
    return adapter


def build(path, config, attach, device, dtype, param_dtype=None):
    """(sharded model, adapter config) for `path`'s base with attach's adapters: the base's tensors in
    `dtype` (float32 master weights for --method full), adapters float32 as attach drew them."""
    with torch.device("meta"):
        model, plain = Transformer(config), Transformer(config)  # plain: the shapes the checkpoint must have
    adapter = _attach_on_meta(model, attach, device)
    shard(model, param_dtype)  # adapters (real) are sharded now; the base's shards are still meta
    params = dict(model.named_parameters())
    state = {name: nn.Parameter(_local(t.to(dtype), params[name]), requires_grad=params[name].requires_grad)
             for name, t in checkpoint_tensors(path, plain)}  # one full tensor in host memory at a time
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model._init_rope(config.max_seq_len, device)  # buffers are not sharded: RoPE tables on every rank
    return model, adapter


@torch.no_grad()
def load_full(model, tensors):
    """Copy full tensors {name: tensor} (a checkpoint's) into a sharded model, each rank its rows."""
    params = dict(model.named_parameters())
    for name, t in tensors.items():
        params[name].copy_(_local(t, params[name]))


def plain(t):
    """t as a plain tensor: clip_grad_norm_ of sharded gradients returns a DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gather(tensors, main):
    """{name: full tensor on the CPU} on the main rank (None elsewhere) of {name: sharded or plain
    tensor}. A collective: every rank calls it with the same names in the same order."""
    full = {}
    for name, t in tensors.items():
        t = t.full_tensor() if isinstance(t, DTensor) else t
        if main:
            full[name] = t.detach().cpu()
    return full if main else None


def gather_optimizer(opt, main):
    """opt.state_dict() with full tensors on the main rank, in the unsharded optimizer's format
    (state keyed by parameter index), so a checkpoint reads the same whatever wrote it."""
    state = opt.state_dict()
    moments = {(i, k): v for i, s in state["state"].items() for k, v in s.items()}
    full = gather({str(key): v for key, v in moments.items()}, main)
    if not main:
        return None
    return {**state, "state": {i: {k: full[str((i, k))] for k in s} for i, s in state["state"].items()}}


def shard_optimizer(state, opt):
    """A checkpoint's optimizer state (full tensors) with each moment cut to its parameter's shard."""
    params = [p for group in opt.param_groups for p in group["params"]]

    def cut(v, p):
        return _local(v, p) if isinstance(p, DTensor) and v.shape == p.shape else v

    return {**state, "state": {i: {k: cut(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}}
