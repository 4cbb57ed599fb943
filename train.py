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
import runs
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
        runs.take_stored_flags(p, argv, args)
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


def token_losses(model, batch):
    """Cross-entropy at every position (B, T), 0 where the target is IGNORE (prompt and padding); the
    model computes its output layer only at the answer positions."""
    return model(batch["tokens"], batch["targets"], reduction="none")


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
    runs.check_out(args)  # checks before work: the flags (get_args), OUT, then build's data and base
    resume = runs.read_resume(args, world) if args.resume else None
    base, tok, model, adapter, train_set, test_set = build(args, device)
    ds = data.TaskDataset(train_set, tok, args.seq_len, verbose=master)
    sampler = data.MixtureSampler(ds.task_of, args.temperature, args.task_cap, args.seed)  # example_stream deals it
    per_step = args.batch_size * args.grad_accum * world  # examples per optimizer step, all ranks
    steps = args.max_steps or max(1, int(args.epochs * len(sampler) / per_step))
    params, opt, sched = make_optimizer(model, args, steps, device)
    progress = dict(step=0, train_time=0.0, tokens=0, loss=None, skipped=0, data=runs.START)
    if resume:
        progress = runs.restore(resume, model, adapter, opt, sched, len(sampler))
    runs.seed_dropout(args, rank, world, resume, device)  # here: neither wrap (DDP, compile) nor logging draws numbers
    resume = None  # the checkpoint's dict goes: its tensors now live in the model and optimizer
    report = teamlora.parameter_report(model)
    log = None
    if master:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            runs.clear_out(out)
        print_config(args, world, steps, report, ds.tasks, len(train_set), len(test_set))
        log = runs.open_log(out, progress["step"])
    raw = model  # checkpoints and the balance term use the module without its DDP wrapper
    model = wrap(model, args, device)
    ddp = isinstance(model, DDP)  # FSDP reduce-scatters at every micro-step: its gradients stay sharded
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(args, device) else nullcontext()
    stream = batches(ds, runs.example_stream(sampler, progress["data"], rank, world), tok, args.batch_size, device,
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
                sums += runs.task_sums(b, losses.detach(), len(ds.tasks))
                aux_sum += aux.detach() / args.grad_accum
            grad_norm = sharding.plain(torch.nn.utils.clip_grad_norm_(params, args.clip or float("inf")))
            totals = runs.step_totals(sums, aux_sum, micro, grad_norm, world, device)  # the step's one collective
            if runs.check_finite(totals, progress, args, ds.tasks):  # else skipped (--skip-nonfinite), or Diverged
                opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            rec = runs.record(totals, grad_norm, lr, time.time() - t0, progress, ds.tasks)
            progress["data"] = runs.advance(progress["data"], per_step, len(sampler), world)  # where the next step starts
            if master:
                runs.write_record(log, rec, bar)
            due = progress["step"] == steps or (args.save_every and progress["step"] % args.save_every == 0)
            if due or totals["stop"]:
                runs.save(raw, adapter, base, opt, sched, progress, args, device)
            if totals["stop"]:  # SIGTERM or SIGUSR1 on some rank, during this step or before it
                preempted(progress, args)
    if master:
        log.close()
        runs.write_summary(out, args, adapter, base, report, progress, steps)
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
