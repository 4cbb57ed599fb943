"""Fine-tune a LLaMA on a multi-task mixture with TeamLoRA or a baseline, in plain PyTorch DDP.

    python train.py --method teamlora                    # quick start: SmolLM2-135M-Instruct (the Hub), cpu preset
    python train.py --method lora --rank 32 --base tiny  # offline: the built-in tiny base, pretrained on first use
    python train.py --out runs/teamlora --resume         # continue a run with its own flags
    torchrun --nproc_per_node 8 train.py --base /ckpt/Llama-2-7b-hf --data my_mix/ --rank 32

One process per device: nccl on GPUs, gloo on CPUs. OUT holds adapters.safetensors, checkpoint.pt
(the format is described in common.py), log.jsonl, summary.json, and from the final evaluation
eval.json, predictions.jsonl and routing.png (eval.py says what they hold). An OUT that holds a run,
finished or started, is refused unless --resume continues it or --overwrite replaces it.
"""
import argparse
import gc
import inspect
import json
import math
import os
import shlex
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; unused here
warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")  # before optimizer.step(): a skipped step 1
import torch  # noqa: E402
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import common
import data
import eval as evaluation
import pretrain
import sharding
import teamlora
from common import UserError, cli
from export import HF_MODULES
from model import Transformer
from report import write_results

# The defaults of the flags whose help says "preset". tiny: the quick start on the tiny base.
# cpu: small real bases on a CPU. paper: the paper's recipe (README, Method notes). 0 = no limit.
PRESETS = {
    "tiny": dict(lr=2e-3, max_steps=400, batch_size=16, grad_accum=1, seq_len=256, warmup=0.03, eval_limit=0),
    "cpu": dict(lr=1e-3, max_steps=300, batch_size=8, grad_accum=1, seq_len=256, warmup=0.05, eval_limit=100),
    "paper": dict(lr=2e-4, max_steps=0, batch_size=4, grad_accum=8, seq_len=1024, warmup=0.03, eval_limit=0),
}


class Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each default; a flag whose default depends on others says so in its own help."""

    def _get_help_string(self, action):
        return action.help if action.default is None or action.default is False else super()._get_help_string(action)


def preset(what):
    values = " / ".join(f"{name} {p[what]:g}" for name, p in PRESETS.items())
    return f"(default by preset: {values})"


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    p.add_argument("--method", default="teamlora", choices=teamlora.METHODS + ("full",),
                   help="adapter kind; full = fine-tune every weight")
    p.add_argument("--rank", type=int, default=8, help="per-expert rank r (LoRA: its rank)")
    p.add_argument("--experts", type=int, default=4, help="k, for the routed methods")
    p.add_argument("--router", choices=teamlora.ROUTERS, help="default: the method's own (teamlora.add_adapters)")
    p.add_argument("--alpha", type=float, default=32.0, help="adapter scale alpha / r")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter input dropout")
    p.add_argument("--targets", type=lambda s: [t for t in s.split(",") if t], default=",".join(teamlora.FFN_TARGETS),
                   help="comma-separated names of the linear layers to adapt")
    p.add_argument("--balance", type=float, default=0.0, help="coefficient of the load-balancing term")
    p.add_argument("--base", default="HuggingFaceTB/SmolLM2-135M-Instruct",
                   help="'tiny', a Hugging Face / Meta checkpoint directory, or a Hub id")
    p.add_argument("--data", help="mixture directory or .jsonl (default: the built-in mixture)")
    p.add_argument("--out", help="output directory (default: runs/METHOD)")
    p.add_argument("--preset", choices=PRESETS, help="the defaults marked preset (default: tiny for --base tiny, "
                                                     "cpu without a GPU, else paper)")
    p.add_argument("--epochs", type=float, default=1.0, help="training length when --max-steps is 0")
    p.add_argument("--max-steps", type=int, help="optimizer steps; 0 = use --epochs " + preset("max_steps"))
    p.add_argument("--batch-size", type=int, help="examples per device per micro-step " + preset("batch_size"))
    p.add_argument("--grad-accum", type=int, help="micro-steps per optimizer step " + preset("grad_accum"))
    p.add_argument("--seq-len", type=int, help="tokens per example, longer inputs are cut " + preset("seq_len"))
    p.add_argument("--lr", type=float, help="peak learning rate " + preset("lr"))
    p.add_argument("--warmup", type=float, help="warm-up fraction of the steps " + preset("warmup"))
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay of the adapter matrices")
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping; 0 = off")
    p.add_argument("--skip-nonfinite", type=int, default=0,
                   help="skip up to N steps whose loss or gradient norm is not finite (no update, counted in the "
                        "log's 'skipped') instead of stopping the run at the first")
    p.add_argument("--temperature", type=float, default=1.0, help="task mixing temperature (1 = by size)")
    p.add_argument("--task-cap", type=int, help="at most this many training examples per task (default: all)")
    p.add_argument("--seed", type=int, default=0, help="adapter init, data order, dropout")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 autocast on GPUs, else float32")
    p.add_argument("--quantize", choices=common.QUANTIZE, help="load the frozen base's block layers quantized "
                   "with bitsandbytes (QLoRA-style: nf4 = 4-bit NormalFloat, int8 = LLM.int8()); default: not")
    p.add_argument("--device", help="default: cuda if there is a GPU, else cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (lengths padded "
                   "to a multiple of 64 so few shapes recompile); the first steps pay minutes of compiling: "
                   "worth it on GPUs for long runs, not on a CPU (README)")
    p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, help="shard weights, gradients and optimizer "
                   "state over the ranks (FSDP2) instead of DDP (default: FSDP under torchrun on GPUs when DDP "
                   "would not fit, README)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute each block's activations in backward")
    again = p.add_mutually_exclusive_group()  # without either, an OUT that holds a run is refused
    again.add_argument("--resume", action="store_true", help="continue the run in OUT from OUT/checkpoint.pt; "
                       "training flags left out take the run's values, those given must match them")
    again.add_argument("--overwrite", action="store_true", help="replace the run that OUT holds, finished or not")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps; 0 = only at the end")
    p.add_argument("--eval-limit", type=int, help="test examples per task at the end; 0 = all " + preset("eval_limit"))
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--pretrain-steps", type=int, default=700, help="steps of the tiny base's pretraining")
    p.add_argument("--timeout", type=float, default=30.0, help="minutes before a collective gives up on a dead rank")
    args = p.parse_args(argv)
    args.out = args.out or f"runs/{args.method}"
    if args.resume:
        take_stored_flags(p, argv, args)
    if args.preset is None:
        gpu = not common.check_device(args.device) and common.default_device(args.device).type == "cuda"
        args.preset = "tiny" if args.base == "tiny" else "paper" if gpu else "cpu"
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    check_args(p, args)
    return args


def check_args(p, args):
    """Every flag's rule, before any data, base or tiny base is read or built: a flag that breaks
    one is refused in one line naming it and the rule (p.error: exit status 2)."""
    for flag, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"--{flag.replace('_', '-')} {value}: must be a finite number")
    rules = {"rank": (args.rank >= 1, "at least 1"), "experts": (args.experts >= 1, "at least 1"),
             "alpha": (args.alpha > 0, "positive (the adapter scale is alpha / r)"),
             "dropout": (0 <= args.dropout < 1, "a probability in [0, 1)"),
             "balance": (args.balance >= 0, "0 (off) or positive"), "epochs": (args.epochs > 0, "positive"),
             "max_steps": (args.max_steps >= 0, "0 (use --epochs) or more"),
             "batch_size": (args.batch_size >= 1, "at least 1"), "grad_accum": (args.grad_accum >= 1, "at least 1"),
             "seq_len": (args.seq_len >= 1, "at least 1"), "lr": (args.lr > 0, "positive"),
             "warmup": (0 <= args.warmup < 1, "a fraction of the steps in [0, 1)"),
             "weight_decay": (args.weight_decay >= 0, "0 or positive"),
             "clip": (args.clip >= 0, "0 (off) or positive: the largest gradient norm"),
             "temperature": (args.temperature > 0, "positive"),
             "task_cap": (args.task_cap is None or args.task_cap >= 1, "at least 1"),
             "save_every": (args.save_every >= 0, "0 (only at the end) or more"),
             "eval_limit": (args.eval_limit >= 0, "0 (all) or more"),
             "pretrain_steps": (args.pretrain_steps >= 1, "at least 1"),
             "timeout": (args.timeout > 0, "positive (minutes)"),
             "skip_nonfinite": (args.skip_nonfinite >= 0, "0 (stop at the first) or more")}
    for flag, (ok, rule) in rules.items():
        if not ok:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be {rule}")
    if args.method == "lora" and args.router:
        p.error("--router: method lora has no router")
    if args.method == "full" and args.quantize:
        p.error("--quantize: --method full trains every weight, and quantized weights cannot be trained")
    if args.fsdp and args.quantize:
        p.error("--quantize: not with --fsdp (bitsandbytes' packed weights are not sharded; DDP holds a 4-bit base)")
    if (why := common.check_device(args.device)) is not None:
        p.error(f"--device {why}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out}: a file, not a directory")
    if args.method != "full":
        try:
            targets = model_targets(args.targets)
        except ValueError as e:
            p.error(f"--targets {e}")
        if "output" in targets and args.method != "lora":
            # model.forward runs the output layer at the answer tokens only, so its router would see
            # other tokens than the balance term's mask and the routing statistics cover
            p.error(f"--targets output: {args.method} routes every token of a layer, but the output layer runs "
                    "only at the answer tokens; adapt it with --method lora, or leave it out")


# model.py's linear layers by their Meta names, each with its Hugging Face name (export.py's table):
# --targets takes either, whatever the base's layout, since model.py always uses Meta's.
HF_NAMES = {**{m.rsplit(".", 1)[1]: hf.rsplit(".", 1)[1] for m, hf in HF_MODULES.items()}, "output": "lm_head"}


def model_targets(names):
    """--targets in model.py's names, each once (Hugging Face's translated: q_proj -> wq, ...).
    A name that is no linear layer of model.py's Transformer, under either naming, is an error."""
    meta = {hf: m for m, hf in HF_NAMES.items()}
    unknown = [n for n in names if n not in HF_NAMES and n not in meta]
    if not names:
        raise ValueError("names no layer")
    if unknown:
        raise ValueError(f"{', '.join(unknown)}: not a linear layer of the model; its layers are "
                         f"{', '.join(HF_NAMES)}, or by their Hugging Face names {', '.join(meta)}")
    return list(dict.fromkeys(meta.get(n, n) for n in names))


def take_stored_flags(p, argv, args):
    """--resume: every training flag not on the command line takes the run's stored value; those
    given must match it (read_resume). Flags of common.RUN_ONLY (--device, --no-eval, --save-every
    ...) say how this command runs, and keep this command's values, given or default.
    The run's data is found as eval.py finds it (common.run_data). Reads OUT/checkpoint.pt
    mapped, not loaded: nothing is built yet."""
    out = Path(args.out)
    if not (out / common.CHECKPOINT).is_file():
        if (out / "log.jsonl").exists():
            raise UserError(f"--resume: {out} holds a run that stopped before its first checkpoint ({out / 'log.jsonl'}"
                            f", no {common.CHECKPOINT}): there is nothing to resume; --overwrite starts it again")
        raise UserError(f"--resume: no {out / common.CHECKPOINT}: there is no run to resume; start without --resume")
    try:
        ckpt = torch.load(out / common.CHECKPOINT, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated, foreign or old (not mappable) file: read_resume says which
        raise common.CheckpointError(f"{out / common.CHECKPOINT}: not a readable checkpoint ({e})") from e
    if "adapter" not in ckpt:  # the older single-file format: read_resume refuses it
        return
    unset = object()  # parsed again into a namespace that holds every flag: argparse sets only those given
    given = {k for k, v in vars(p.parse_args(argv, argparse.Namespace(**dict.fromkeys(vars(args), unset)))).items()
             if v is not unset}
    stored = {**ckpt["config"], "data": common.run_data(ckpt)}
    for k, v in stored.items():
        if k in vars(args) and k not in given and k not in common.RUN_ONLY:
            setattr(args, k, v)


# ----------------------------------------------------------------------------- building the run


def adapter_kwargs(args):
    """teamlora.add_adapters' keyword arguments from the flags (no router flag: add_adapters picks)."""
    kwargs = dict(method=args.method, rank=args.rank, experts=args.experts, alpha=args.alpha,
                  dropout=args.dropout, targets=model_targets(args.targets))
    if args.router:
        kwargs["router"] = args.router
    return kwargs


def attach(model, args):
    """Add the flags' adapters to model; returns the adapter config as built (None for full)."""
    if args.method == "full":
        return None
    try:
        teamlora.add_adapters(model, **adapter_kwargs(args))
    except ValueError as e:  # e.g. no layer named like --targets
        raise UserError(str(e)) from None
    routers = {layer.router.kind for _, layer in teamlora.adapter_layers(model) if layer.routed}
    adapter = adapter_kwargs(args)
    if routers:
        adapter["router"] = routers.pop()  # the router as used, whoever chose it
    return adapter


def build(args, device):
    """(base directory, tokenizer, frozen base + adapters, the adapter config as built, train, test).
    What a user can get wrong is checked before the base's weights are read: the data, the base's
    tokenizer and config, and the adapter flags (on the model built without storage)."""
    train, test = data.load_mixture(args.data)
    if args.base == "tiny" and common.is_main():
        pretrain.tiny_base(args.pretrain_steps, device)  # first use only; the other ranks wait at the barrier
    common.barrier()
    base = common.base_dir(args.base, args.pretrain_steps)
    tok, config = common.check_base(base)
    with torch.device("meta"):  # the adapter flags tried on a model without storage
        attach(Transformer(config), args)
    # A frozen base in bf16 on GPUs (CPUs: float32); full fine-tuning keeps float32 master weights,
    # cast from the checkpoint's own dtype (an fp16 or fp32 base loses no bits on the way).
    bf16 = use_bf16(args, device) and device.type == "cuda"
    dtype = torch.bfloat16 if bf16 and args.method != "full" else torch.float32
    torch.manual_seed(args.seed)  # the same adapter initialisation on every rank and every run
    if not args.quantize and use_fsdp(args, config, device):  # a quantized base: DDP (get_args refuses --fsdp)
        model, adapter = sharding.build(base, config, lambda m: attach(m, args), device, dtype,
                                        torch.bfloat16 if bf16 and args.method == "full" else None)
    else:
        model = common.load_base(base, dtype, device, args.quantize)
        adapter = attach(model, args)
    model.gradient_checkpointing = args.grad_checkpoint
    return base.resolve(), tok, model, adapter, train, test


def use_fsdp(args, config, device):
    """--fsdp as given; by default under torchrun on GPUs when DDP's copy of the model would take
    over 60% of a GPU. Per parameter, DDP holds: a frozen base 2 bytes (bf16); --method full 4
    (float32 weight) + 4 (gradient) + 4 (DDP's bucket) + 8 (AdamW moments) + 2 (autocast's copy)."""
    if args.fsdp is not None or not dist.is_initialized() or device.type != "cuda":
        return bool(args.fsdp) and dist.is_initialized()
    with torch.device("meta"):
        n = sum(p.numel() for p in Transformer(config).parameters())
    need, have = n * (22 if args.method == "full" else 2), torch.cuda.get_device_properties(device).total_memory
    if need > 0.6 * have and common.is_main():
        print(f"--fsdp chosen: DDP would hold {need / 2**30:.0f} GiB of a {have / 2**30:.0f} GiB GPU (--no-fsdp: DDP)")
    return need > 0.6 * have


def use_bf16(args, device):
    """bfloat16 autocast: asked for, or by default on GPUs (whose base weights are then bfloat16 too)."""
    return args.dtype == "bfloat16" or (args.dtype is None and device.type == "cuda")


def make_optimizer(model, args, steps, device):
    """AdamW on the trainable parameters (no weight decay on vectors), cosine schedule with warm-up."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
    warmup = int(args.warmup * steps)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))


def cosine_lr(step, total, warmup):
    """Multiplier of the peak lr: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


# Where all ranks together stand in the stream of examples: the epoch, and how far into its order.
START = {"epoch": 0, "offset": 0, "examples_seen": 0}


def example_stream(sampler, position, rank, world):
    """This rank's example indices from `position` on. Each epoch's order (the global one: sampler
    has one rank) is cut, from the position's offset, to a multiple of world and dealt out: rank r
    takes every world-th example from r. So a step of all ranks takes a contiguous run of the
    order, and a resume on any number of ranks goes on at the same example (advance says which)."""
    if len(sampler) < world:
        raise UserError(f"{len(sampler)} training examples cannot feed {world} processes")
    epoch, offset = position["epoch"], position["offset"]
    while True:
        order = sampler.epoch(epoch)
        yield from order[offset:offset + (len(order) - offset) // world * world][rank::world]
        epoch, offset = epoch + 1, 0


def advance(position, n, epoch_size, world):
    """The position n examples (all ranks together, a multiple of world) after `position`, for
    example_stream on `world` ranks: what an epoch holds past a multiple of world is passed over."""
    epoch, offset = position["epoch"], position["offset"]
    seen = position["examples_seen"] + n
    while True:
        left = (epoch_size - offset) // world * world  # what this epoch still deals out
        if n < left:
            return {"epoch": epoch, "offset": offset + n, "examples_seen": seen}
        epoch, offset, n = epoch + 1, 0, n - left


def batches(ds, indices, tok, batch_size, device, bucket=1):
    """Micro-batches of exactly batch_size examples from an index stream (one may span two epochs).
    bucket: lengths are padded up to a multiple of it (at most to the longest example), for --compile."""
    longest = max(len(x) for x, _ in ds.items)
    while True:
        chunk = [next(indices) for _ in range(batch_size)]
        batch = pad_length(data.collate([ds[i] for i in chunk], tok.pad_id), bucket, longest, tok.pad_id)
        yield {k: v.to(device) for k, v in batch.items()}


def pad_length(batch, bucket, longest, pad_id):
    """The batch right-padded as collate pads (pad_id, IGNORE, mask false) to the next multiple of
    bucket tokens, at most `longest`: a compiled block then meets a few lengths, not every one."""
    T = batch["tokens"].shape[1]
    extra = min(-(-T // bucket) * bucket, max(T, longest)) - T
    fill = {"tokens": pad_id, "targets": data.IGNORE, "mask": False}
    return {k: torch.cat([v, v.new_full((len(v), extra), fill[k])], 1) if k in fill and extra else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- resuming

def check_out(args):
    """A new run into an OUT that holds one, finished or started, needs --resume or --overwrite."""
    out = Path(args.out)
    held = [f for f in (common.CHECKPOINT, "log.jsonl") if (out / f).exists()]
    if held and not (args.resume or args.overwrite):
        if common.CHECKPOINT not in held:
            raise UserError(f"--out {out} holds a run that stopped before its first checkpoint (log.jsonl only): "
                            "--overwrite starts it again (--resume has nothing to continue)")
        raise UserError(f"--out {out} holds a run already ({', '.join(held)}): --resume continues it, "
                        "--overwrite replaces it")


def clear_out(out):
    """--overwrite: the earlier run's files go, so none of them is taken for the new run's."""
    for name in common.OUTPUTS:
        for f in (out / name, out / (name + ".tmp")):
            f.unlink(missing_ok=True)


def read_resume(args, world):
    """OUT/checkpoint.pt for --resume, refused unless it continues this very run. The number of
    processes and the split of the global batch into --batch-size x --grad-accum may change, the
    global batch may not; a changed layout continues at the same example, not bit for bit."""
    out = Path(args.out)
    if not (out / common.CHECKPOINT).exists():
        raise UserError(f"--resume: no {out / common.CHECKPOINT}; start without --resume")
    ckpt = common.read_checkpoint(out)
    if ckpt.get("legacy"):
        raise UserError(f"--resume: {out} was written by an older train.py; eval.py reads it, resuming needs a new run")
    now, then = vars(args), as_stored(ckpt, vars(args))
    was, will = layout(len(ckpt["rng"]), then), layout(world, now)
    split = ("batch_size", "grad_accum") if was[1] == will[1] else ()  # the global batch holds: its split may change
    changed = [f"--{k.replace('_', '-')} {then.get(k)} (now {now[k]})" for k in now
               if k not in common.RUN_ONLY + split and now[k] != then.get(k)]
    if was[1] != will[1]:
        changed.append(f"{was[1]} examples per step ({was[0]}; now {will[1]}: choose --batch-size and --grad-accum "
                       f"for {was[1]})")
    if changed:
        raise UserError(f"--resume: {out} was trained with other flags: {', '.join(changed)}")
    if was != will and common.is_main():
        print(f"resuming {out} ({was[0]}) on {will[0]}: the data go on at example {ckpt['step'] * was[1]} of the "
              "mixture's stream; not exact: each rank's dropout stream (new ones, from --seed, rank and step) and "
              "the order of floating-point sums")
    return ckpt


def as_stored(ckpt, now):
    """The run's stored flags, with --base and --data as this command gives them where they name
    the stored place another way (a relative path from elsewhere), and --base as given when the
    stored base directory is gone (the base moved: the command says where it is now)."""
    then = dict(ckpt["config"])
    for flag, path in (("base", ckpt.get("base_path")), ("data", ckpt.get("data_path"))):
        given = now[flag]
        if given and path and given != then.get(flag) and \
                (Path(given).resolve() == Path(path) or (flag == "base" and not Path(path).is_dir())):
            then[flag] = given
    return then


def layout(world, config):
    """(what it says, global batch): how a step's examples are split into processes and micro-steps."""
    b, a = config["batch_size"], config["grad_accum"]
    return f"{world} process{'es' * (world > 1)} x {b} examples x {a} micro-steps", world * b * a


def restore(ckpt, model, adapter, opt, sched, epoch_size):
    """Trained tensors, optimizer and scheduler from a checkpoint (under FSDP each rank keeps its
    shard of them); returns its progress."""
    sharded = sharding.is_sharded(model)
    if sharded:
        sharding.load_full(model, ckpt["tensors"])  # a tied output layer is stored once, as its embedding
    elif adapter is None:
        model.load_state_dict(ckpt["tensors"], strict=False)  # a tied output layer is stored once
    else:
        teamlora.load_adapter_state_dict(model, ckpt["tensors"])
    opt.load_state_dict(sharding.shard_optimizer(ckpt["optimizer"], opt) if sharded else ckpt["optimizer"])
    sched.load_state_dict(ckpt["scheduler"])
    return {**{k: ckpt[k] for k in ("step", "train_time", "tokens", "loss")}, "skipped": ckpt.get("skipped", 0),
            "data": data_position(ckpt, epoch_size)}


def data_position(ckpt, epoch_size):
    """Where a checkpoint's run stands in the stream; one written before positions were global
    holds each rank's count only, and had dealt the epochs as example_stream does on its ranks."""
    if "epoch" in ckpt["data"]:
        return ckpt["data"]
    return advance(START, ckpt["step"] * layout(len(ckpt["rng"]), ckpt["config"])[1], epoch_size, len(ckpt["rng"]))


def seed_dropout(args, rank, world, resume, device):
    """Each rank's dropout stream: from --seed + rank; on a resume its saved state, or, on another
    layout (read_resume), a new stream per rank and step: the one part of a resume that cannot be exact."""
    torch.manual_seed(args.seed + rank)  # dropout differs per rank; data order comes from the sampler
    if resume and layout(len(resume["rng"]), resume["config"]) == layout(world, vars(args)):
        torch.set_rng_state(resume["rng"][rank]["cpu"])
        if device.type == "cuda" and "cuda" in resume["rng"][rank]:
            torch.cuda.set_rng_state(resume["rng"][rank]["cuda"])
    elif resume:
        torch.manual_seed(args.seed + rank + world * resume["step"])


def save(model, adapter, base, opt, sched, progress, args, device):
    """Every rank hands in its RNG state (so a resume continues each dropout stream); rank 0 writes."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rngs = [rng]
    if dist.is_initialized():
        flat = torch.cat(list(rng.values())).to(device)  # RNG states are uint8 tensors of fixed size
        parts = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, flat)
        sizes = [v.numel() for v in rng.values()]
        rngs = [dict(zip(rng, p.cpu().split(sizes))) for p in parts]
    main = common.is_main()
    tensors, optimizer = None, None
    if sharding.is_sharded(model):  # every rank hands in its shards; rank 0 gets the full tensors
        tensors = sharding.gather(common.trained_tensors(model, adapter), main)
        optimizer = sharding.gather_optimizer(opt, main)
    if main:
        state = {"config": vars(args), "adapter": adapter, "base_path": str(base), "data_path": data_path(args),
                 **progress,  # data: where step+1 starts
                 "optimizer": optimizer or opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs}
        common.save_checkpoint(args.out, tensors or common.trained_tensors(model, adapter), state)


# ----------------------------------------------------------------------------- the step's bookkeeping


def token_losses(model, batch):
    """Cross-entropy at every position (B, T), 0 where the target is IGNORE (prompt and padding); the
    model computes its output layer only at the answer positions."""
    return model(batch["tokens"], batch["targets"], reduction="none")


def task_sums(batch, losses, n_tasks):
    """(2, n_tasks): summed answer-token loss and number of answer tokens of each task."""
    sums = torch.zeros(2, n_tasks, dtype=torch.float64, device=losses.device)
    sums[0].index_add_(0, batch["task"], losses.sum(1).double())
    sums[1].index_add_(0, batch["task"], (batch["targets"] != data.IGNORE).sum(1).double())
    return sums


def step_totals(sums, aux, micro, grad_norm, world, device):
    """The step's one collective, between backward and the update, read back once: the per-task
    sums (2, n_tasks), the balance term, the input tokens and two flags (a non-finite gradient
    norm, a stop signal) over all ranks, so that every rank takes the same decisions."""
    flags = torch.tensor([sum(b["tokens"].numel() for b in micro), bool(common.stop_signal)], device=device)
    local = torch.cat([sums.flatten(), aux.view(1), (~torch.isfinite(grad_norm)).view(1), flags]).double()
    total = common.all_reduce(local, device).tolist()
    n = sums.numel()
    return {"sums": torch.tensor(total[:n], dtype=torch.float64).view(sums.shape), "aux": total[n] / world,
            "grad_finite": total[n + 1] == 0, "tokens": int(total[n + 2]), "stop": total[n + 3] > 0}


def check_finite(totals, progress, args, tasks):
    """True: the step may update. A loss or gradient norm that is not finite on any rank stops the
    run before the optimizer steps (Diverged), or while --skip-nonfinite allows, skips the update
    (False): the step still counts, its examples are used up and the lr schedule moves on, so the
    step count stays the data position and a resume goes on alike."""
    bad = [t for t, s in zip(tasks, totals["sums"][0].tolist()) if not math.isfinite(s)]
    if not bad and totals["grad_finite"]:
        return True
    if progress["skipped"] < args.skip_nonfinite:
        progress["skipped"] += 1
        return False
    what = f"the loss of task{'s' * (len(bad) > 1)} {', '.join(bad)}" if bad else "the gradient norm"
    skipped = f"{progress['skipped']} skipped already; " if progress["skipped"] else ""
    raise common.Diverged(f"error: step {progress['step'] + 1}: {what} is not finite; stopped before its update, "
                          f"{args.out} keeps its last checkpoint ({skipped}--resume --skip-nonfinite N skips up to N "
                          "such steps)")


def record(totals, grad_norm, lr, dt, progress, tasks):
    """The step's log record from its totals over all ranks (null for what is not finite: a skipped
    step); adds the step's time and input tokens to progress."""
    sums, tokens = totals["sums"], totals["tokens"]
    loss = (sums[0].sum() / sums[1].sum()).item()
    progress.update(step=progress["step"] + 1, train_time=progress["train_time"] + dt,
                    tokens=progress["tokens"] + tokens, loss=loss if math.isfinite(loss) else progress["loss"])
    return {"step": progress["step"], "loss": finite(loss), "aux": finite(totals["aux"]), "lr": lr,
            "grad_norm": finite(grad_norm.item()), "tokens_per_s": tokens / dt, "skipped": progress["skipped"],
            "task_loss": {t: finite((sums[0, i] / sums[1, i]).item()) for i, t in enumerate(tasks) if sums[1, i] > 0}}


def finite(x):
    return x if math.isfinite(x) else None


def open_log(out, step):
    """log.jsonl for appending, line-buffered: each record is in the file (tail -f, a crash) before
    the next step starts. Records after `step` (a resume is about to redo them) are dropped."""
    old = (out / "log.jsonl").read_text().splitlines() if step and (out / "log.jsonl").exists() else []
    common.atomic_save("".join(r + "\n" for r in old if json.loads(r)["step"] <= step), out / "log.jsonl")
    try:
        return open(out / "log.jsonl", "a", buffering=1)
    except OSError as e:
        raise common.write_failed(out / "log.jsonl", e) from e


def write_record(log, rec, bar):
    """rec into log.jsonl (a write that fails stops the run with one line naming the file)."""
    try:
        log.write(json.dumps(rec) + "\n")
    except OSError as e:
        raise common.write_failed(Path(log.name), e) from e
    bar.update(1)
    bar.set_postfix(loss="skipped" if rec["loss"] is None else f"{rec['loss']:.3f}", lr=f"{rec['lr']:.1e}")


# ----------------------------------------------------------------------------- stopping: signals, a lost rank

def preempted(progress, args):
    """The stop after a signal's checkpoint: every rank first waits for rank 0 to write it (a
    launcher tears all ranks down as soon as one exits)."""
    common.barrier()
    why = common.stop_signal[0] if common.stop_signal else "a signal to another rank"
    common.stop_signal.clear()  # answered: a later run in this process (a test, a notebook) starts afresh
    raise common.Preempted(f"stopped on {why} after step {progress['step']}, saved in {args.out}")


def one_line(e, argv, args, rank, world):
    """The Stop a run exits with, made anew so that no frame of train() (nor its DDP wrapper) stays
    referenced: a collective's error becomes one line naming this rank and --timeout, and a
    preemption's line gets the command that continues the run."""
    if isinstance(e, common.Preempted):
        return common.Preempted(f"{e}; continue with: {resume_command(argv, world)}")
    if isinstance(e, common.Stop):
        return type(e)(str(e))
    reason = str(e).split("] ", 1)[-1].split(". ")[0]  # gloo: "[pair.cc:537] Read error ...: Connection reset. ..."
    return common.RankLost(f"error: rank {rank} of {world}: a collective failed ({reason}): another rank died or did "
                           f"not answer within --timeout {args.timeout:g} min; {args.out} keeps its last checkpoint, "
                           "--resume continues from it")


def resume_command(argv, world):
    """The command line that continues this run (on this many processes, or any other)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    launcher = ["python"] if "RANK" not in os.environ else ["torchrun", f"--nproc_per_node={local}"]
    if world > local:
        launcher.insert(1, f"--nnodes={world // local}")
    flags = [a for a in argv if a not in ("--resume", "--overwrite")]
    return shlex.join([*launcher, os.path.relpath(__file__), *flags, "--resume"])


# ----------------------------------------------------------------------------- the run


def balance_loss(model, batch, coefficient, device):
    """The load-balancing term of the last forward over the batch's real tokens; at --balance 0 it is
    not computed at all (its boolean indexing costs a device-to-host sync per routed layer)."""
    if coefficient == 0:
        return torch.zeros((), device=device)
    return teamlora.adapter_aux_loss(model, mask=batch["mask"]).to(device)


def wrap(model, args, device):
    """The module the loop calls: --compile compiles each block in place (the names in checkpoints
    stay; the root's data-dependent answer-position gather stays eager), then DDP under torchrun
    unless the model is sharded (FSDP's units are its blocks already)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (--method full's, the router's) in TF32
    elif use_bf16(args, device) and not cpu_has_bf16() and common.is_main():
        print("note: this CPU has no bf16 instructions (avx512_bf16 / amx_bf16): --dtype bfloat16 runs "
              "~15x slower than float32 here (a SmolLM2 step: ~70 s against ~4 s); use float32 on this machine")
    if args.compile:
        for block in model.layers:
            block.compile()
    if not dist.is_initialized() or sharding.is_sharded(model):
        return model
    # Every rank reads the same base and draws the same adapters (seeded), so nothing is broadcast at
    # start (init_sync), nor the buffers (RoPE tables, TeamLoRA's expand) at every forward.
    quiet = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, init_sync=False, **{quiet: False})


def cpu_has_bf16():
    """True when the CPU computes bf16 natively (x86: AVX512-BF16 or AMX; Arm: the bf16 extension)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: no way to tell, so no note
        return True
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def train(args, rank, world, device):
    """The run, from building the model to the final evaluation (main sets up the processes)."""
    master = rank == 0  # the process that logs and writes
    out = Path(args.out)
    check_out(args)  # checks before work: the flags (get_args), OUT, then build's data and base
    resume = read_resume(args, world) if args.resume else None
    base, tok, model, adapter, train_set, test_set = build(args, device)
    ds = data.TaskDataset(train_set, tok, args.seq_len, verbose=master)
    sampler = data.MixtureSampler(ds.task_of, args.temperature, args.task_cap, args.seed)  # example_stream deals it
    per_step = args.batch_size * args.grad_accum * world  # examples per optimizer step, all ranks
    steps = args.max_steps or max(1, int(args.epochs * len(sampler) / per_step))
    params, opt, sched = make_optimizer(model, args, steps, device)
    progress = dict(step=0, train_time=0.0, tokens=0, loss=None, skipped=0, data=START)
    if resume:
        progress = restore(resume, model, adapter, opt, sched, len(sampler))
    seed_dropout(args, rank, world, resume, device)  # here: neither wrap (DDP, compile) nor logging draws numbers
    resume = None  # the checkpoint's dict goes: its tensors now live in the model and optimizer
    report = teamlora.parameter_report(model)
    log = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            clear_out(out)
        print_config(args, world, steps, report, ds.tasks, len(train_set), len(test_set))
        log = open_log(out, progress["step"])
    raw = model  # checkpoints and the balance term use the module without its DDP wrapper
    model = wrap(model, args, device)
    ddp = isinstance(model, DDP)  # FSDP reduce-scatters at every micro-step: its gradients stay sharded
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(args, device) else nullcontext()
    stream = batches(ds, example_stream(sampler, progress["data"], rank, world), tok, args.batch_size, device,
                     64 if args.compile else 1)
    if progress["step"] >= steps and master:
        print(f"{out} finished its {steps} steps already; nothing to train")
    with tqdm(total=steps, initial=progress["step"], desc=args.method, disable=not master, dynamic_ncols=True) as bar:
        model.train()
        while progress["step"] < steps:
            t0 = time.time()
            lr = sched.get_last_lr()[0]  # the lr this step uses; sched.step() below sets the next one
            micro = [next(stream) for _ in range(args.grad_accum)]
            # The loss is summed over answer tokens and divided by the step's answer tokens on all
            # ranks, times the world size since DDP averages gradients: one process on the global batch.
            n_answer = common.all_reduce(sum((b["targets"] != data.IGNORE).sum() for b in micro).float(), device)
            sums = torch.zeros(2, len(ds.tasks), dtype=torch.float64, device=device)
            aux_sum = torch.zeros((), device=device)
            for i, b in enumerate(micro):
                if ddp:  # gradients sync across ranks on the last micro-step only, set before its forward
                    model.require_backward_grad_sync = i == args.grad_accum - 1
                with autocast:
                    losses = token_losses(model, b)  # (B, T)
                aux = balance_loss(raw, b, args.balance, device)  # balance, over real tokens
                loss = losses.sum() * world / n_answer + args.balance * aux / args.grad_accum
                loss.backward()
                sums += task_sums(b, losses.detach(), len(ds.tasks))
                aux_sum += aux.detach() / args.grad_accum
            grad_norm = sharding.plain(torch.nn.utils.clip_grad_norm_(params, args.clip or float("inf")))
            totals = step_totals(sums, aux_sum, micro, grad_norm, world, device)  # the step's one collective
            if check_finite(totals, progress, args, ds.tasks):  # else skipped (--skip-nonfinite), or Diverged
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            rec = record(totals, grad_norm, lr, time.time() - t0, progress, ds.tasks)
            progress["data"] = advance(progress["data"], per_step, len(sampler), world)  # where the next step starts
            if master:
                write_record(log, rec, bar)
            due = progress["step"] == steps or (args.save_every and progress["step"] % args.save_every == 0)
            if due or totals["stop"]:
                save(raw, adapter, base, opt, sched, progress, args, device)
            if totals["stop"]:  # SIGTERM or SIGUSR1 on some rank, during this step or before it
                preempted(progress, args)
    if master:
        log.close()
        write_summary(out, args, adapter, base, report, progress, steps)
    del model, raw, params, opt, sched  # the training state goes before the evaluation's model comes
    if not args.no_eval:
        final_eval(base, tok, train_set, test_set, args, report, progress, device)


def print_config(args, world, steps, report, tasks, n_train, n_test):
    """The resolved flags, the global batch and the parameter counts, once (rank 0)."""
    print(f"config: {json.dumps(vars(args))}")
    print(f"global batch: {world} process{'es' * (world > 1)} x {args.batch_size} examples x {args.grad_accum} "
          f"micro-steps = {world * args.batch_size * args.grad_accum} examples per step; {steps} steps; "
          f"{n_train} train / {n_test} test examples, tasks {tasks}")
    print(f"{args.method}: {report['trainable']:,} trainable of {report['base']:,} base parameters "
          f"({report['trainable_pct']:.3f}%; router {report['router']:,})")


def data_path(args):
    """The mixture's absolute path, stored beside --data as given (None: the built-in mixture)."""
    return str(Path(args.data).resolve()) if args.data else None


def write_summary(out, args, adapter, base, report, progress, steps):
    """summary.json: the run's config, cost and final loss (eval.py --compare reads it)."""
    summary = {"config": vars(args), "adapter": adapter, "base_path": str(base), "data_path": data_path(args),
               "trainable": report["trainable"],
               "trainable_pct": report["trainable_pct"], "router_params": report["router"], "steps": steps,
               "train_time_s": progress["train_time"], "tokens": progress["tokens"],
               "tokens_per_s": progress["tokens"] / max(progress["train_time"], 1e-9), "final_loss": progress["loss"]}
    common.atomic_save(json.dumps(summary, indent=1), out / "summary.json")


def final_eval(base, tok, train_set, test_set, args, report, progress, device):
    """Score the test split as `eval.py --ckpt OUT` does: the run reloaded from OUT as eval.py loads
    it (its dtype, no optimizer state or DDP/FSDP wrapper left), every rank its share, the majority
    baseline from the training labels; rank 0 prints the tables and writes eval.json,
    predictions.jsonl, routing.png."""
    if not test_set:
        if common.is_main():
            print(f"no test split in {args.data}: evaluation skipped")
        return
    gc.collect()  # the training model's last references (DDP's reference cycle) go before the next one loads
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = evaluation.load_for_eval(common.read_checkpoint(args.out), base, device)
    predictions = []
    results = evaluation.evaluate(model, tok, test_set, args.seq_len, limit=args.eval_limit or None,
                                  majority=evaluation.majority_labels(train_set), predictions=predictions)
    if common.is_main():
        write_results(args.out, {**results, "data": args.data, "limit": args.eval_limit or None}, predictions)
        print(f"{args.method}: {report['trainable']:,} trainable parameters ({report['trainable_pct']:.3f}% "
              f"of the base; router {report['router']:,}); trained {progress['train_time']:.0f} s; -> {args.out}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = get_args(argv)
    with common.distributed(args.device, args.timeout) as (rank, world, device):
        try:
            return train(args, rank, world, device)  # returned: its DDP wrapper is freed before the group is destroyed
        except (common.Stop, RuntimeError) as e:
            if not isinstance(e, common.Stop) and not common.collective_failed(e):
                raise  # a bug: its traceback
            stop = one_line(e, argv, args, rank, world)
        raise stop  # outside the except, nothing holds train()'s frames


if __name__ == "__main__":
    common.catch_stop_signals()
    cli(main)
