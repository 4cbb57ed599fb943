"""Fine-tune a LLaMA on a multi-task mixture with TeamLoRA or a baseline, in plain PyTorch DDP.

    python train.py --method teamlora                    # CPU quick start: tiny base + built-in mixture
    torchrun --nproc_per_node 8 train.py --method teamlora --base /ckpt/Llama-2-7b-hf --data my_mix/ --preset paper

One process per device; nccl on GPUs, gloo on CPUs. `--base tiny` (the default) pretrains a small
LLaMA on the built-in corpus on first use (every weight trained, next-token loss) and caches it.
The output directory holds checkpoint.pt (adapters + everything needed to resume), log.jsonl,
summary.json and, after the final evaluation, eval.json.
"""
import argparse
import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; unused here
import torch  # noqa: E402
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import eval as evaluation
import teamlora
from model import ModelArgs, Transformer, load_tokenizer

CACHE = Path(os.environ.get("TEAMLORA_CACHE", Path(__file__).parent / "cache"))
TINY = ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=4096, hidden_dim=688,
                 max_seq_len=512, tie_embeddings=True)  # ~4.5M parameters; see README for how it was chosen
# Defaults by base. "paper": the paper's recipe (README, Method notes). "tiny": the CPU quick start on the tiny base.
PRESETS = {
    "paper": dict(lr=2e-4, epochs=1.0, max_steps=0, batch_size=4, grad_accum=8, seq_len=1024, warmup=0.03),
    "tiny": dict(lr=2e-3, epochs=1.0, max_steps=400, batch_size=16, grad_accum=1, seq_len=256, warmup=0.03),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="teamlora", choices=teamlora.METHODS + ("full",))
    p.add_argument("--rank", type=int, default=8, help="per-expert rank r (LoRA: its rank)")
    p.add_argument("--experts", type=int, default=4, help="k, for the routed methods")
    p.add_argument("--router", choices=teamlora.ROUTERS, default=None, help="default: shapley for teamlora, else softmax")
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--targets", default="w1,w2,w3,gate_proj,up_proj,down_proj", help="comma-separated module names")
    p.add_argument("--balance", type=float, default=0.0, help="coefficient of the load-balancing term")
    p.add_argument("--base", default="tiny", help="'tiny' or a Hugging Face / Meta checkpoint directory")
    p.add_argument("--data", default=None, help="mixture directory or .jsonl (default: the built-in mixture)")
    p.add_argument("--out", default=None, help="output directory (default: runs/<method>)")
    p.add_argument("--preset", choices=PRESETS, default=None, help="defaults below; tiny for --base tiny, else paper")
    p.add_argument("--epochs", type=float, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps; 0 = use --epochs")
    p.add_argument("--batch-size", type=int, default=None, help="examples per device per micro-step")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--warmup", type=float, default=None, help="warm-up fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping; 0 = off")
    p.add_argument("--temperature", type=float, default=1.0, help="task mixing temperature (1 = by size)")
    p.add_argument("--task-cap", type=int, default=None, help="at most this many training examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 autocast on GPU")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--save-every", type=int, default=200, help="checkpoint every N steps")
    p.add_argument("--eval-limit", type=int, default=None, help="at most N test examples per task at the end")
    p.add_argument("--no-eval", action="store_true")
    p.add_argument("--pretrain-steps", type=int, default=700, help="steps of the tiny base's pretraining")
    p.add_argument("--timeout", type=float, default=30.0, help="minutes before a collective gives up on a dead rank")
    args = p.parse_args(argv)
    preset = PRESETS[args.preset or ("tiny" if args.base == "tiny" else "paper")]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.targets = [t for t in args.targets.split(",") if t]
    args.out = args.out or f"runs/{args.method}"
    return args


def cosine_lr(step, total, warmup):
    """Multiplier of the peak lr: linear warm-up over `warmup` steps, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def micro_step(model, batch, n_tokens, args, autocast):
    """Forward + backward of one micro-batch. The loss is summed over answer tokens and divided
    by the step's global token count (all micro-steps, all ranks) times world size, since DDP
    averages gradients: the result equals one process on the whole global batch."""
    tokens, targets = batch["tokens"], batch["targets"]
    with autocast:
        logits = model(tokens)
    loss_tok = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=data.IGNORE,
                               reduction="none").view_as(targets)  # (B, T)
    world = dist.get_world_size() if dist.is_initialized() else 1
    loss = loss_tok.sum() * world / n_tokens
    aux = torch.zeros((), device=tokens.device)
    if args.method != "full":
        aux = teamlora.adapter_aux_loss(model, mask=targets != data.IGNORE)
        if args.balance > 0:
            loss = loss + args.balance * aux / args.grad_accum
    loss.backward()
    per_task = torch.zeros(2, len(args.tasks), device=tokens.device, dtype=torch.float64)  # (sum, count) per task
    per_task[0].index_add_(0, batch["task"], loss_tok.detach().sum(1).double())
    per_task[1].index_add_(0, batch["task"], (targets != data.IGNORE).sum(1).double())
    return per_task, aux.detach()


def tiny_base(args, rank, device):
    """The built-in base: tokenizer and 4-layer LLaMA trained on the built-in corpus plus the
    mixture's unlabelled text, on first use; cached in CACHE/tiny-base. Rank 0 builds it."""
    path = CACHE / "tiny-base"
    if rank == 0 and not (path / "params.json").exists():
        path.mkdir(parents=True, exist_ok=True)
        train, _ = data.load_mixture(None)
        texts = list(data.pretraining_texts(train))
        t0 = time.time()
        data.train_tokenizer(texts, path / "tokenizer", vocab_size=TINY.vocab_size)
        tok = load_tokenizer(path)
        stream = data.lm_stream(tok, texts)
        torch.manual_seed(0)
        model = Transformer(TINY).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
        steps, gen = args.pretrain_steps, torch.Generator().manual_seed(0)
        for step in (bar := tqdm(range(steps), desc="pretraining tiny base", dynamic_ncols=True)):
            for g in opt.param_groups:
                g["lr"] = 3e-3 * cosine_lr(step, steps, 50)
            x, y = data.lm_batch(stream, 16, 128, gen)
            loss = F.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        model.save_pretrained(path)  # params.json last, so a crash leaves no half-built cache
        print(f"tiny base: {stream.numel():,} tokens, final loss {loss.item():.3f}, {time.time() - t0:.0f} s -> {path}")
    if dist.is_initialized():
        dist.barrier()
    return path


def build(args, rank, world, device):
    """Base model (frozen) + adapters, tokenizer, and the tokenized mixture."""
    base = tiny_base(args, rank, device) if args.base == "tiny" else Path(args.base)
    tok = load_tokenizer(base)
    model = Transformer.from_pretrained(base, dtype=torch.float32 if device.type == "cpu" else args.param_dtype,
                                        device=device)
    model.gradient_checkpointing = args.grad_checkpoint
    if args.method == "full":
        model.float()  # full fine-tuning keeps float32 master weights
    else:
        torch.manual_seed(args.seed)  # the same adapter initialisation on every rank and every run
        teamlora.add_adapters(model, args.method, args.rank, args.experts, args.alpha, args.dropout,
                              args.targets, args.router)
        model.to(device)
    train, test = data.load_mixture(args.data)
    return str(base.resolve()), tok, model, train, test


def train(args):
    rank, world, device = evaluation.setup_distributed(args.device, args.timeout)
    main = rank == 0
    try:
        use_bf16 = args.dtype == "bfloat16" or (args.dtype is None and device.type == "cuda")
        args.param_dtype = torch.bfloat16 if use_bf16 else torch.float32
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
        out = Path(args.out)
        ckpt_path = out / "checkpoint.pt"
        resume = torch.load(ckpt_path, map_location="cpu", weights_only=True) if args.resume else None
        if resume is None and args.resume:
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        base, tok, model, train_set, test_set = build(args, rank, world, device)
        args.base_path = base
        ds = data.TaskDataset(train_set, tok, args.seq_len, verbose=main)
        args.tasks = ds.tasks
        sampler = data.MixtureSampler(ds.task_of, args.temperature, args.task_cap, args.seed, rank, world)
        per_step = args.batch_size * args.grad_accum  # examples per rank per optimizer step
        steps = args.max_steps or max(1, int(args.epochs * len(sampler) / per_step))
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                 {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                lr=args.lr, betas=(0.9, 0.999), fused=device.type == "cuda")
        warmup = int(args.warmup * steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, steps, warmup))
        step, train_time = 0, 0.0
        if resume:
            teamlora.load_adapter_state_dict(model, resume["adapters"]) if args.method != "full" \
                else model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sched.load_state_dict(resume["scheduler"])
            step, train_time = resume["step"], resume["train_time"]
            if len(resume["rng"]) != world:
                raise ValueError(f"--resume: {ckpt_path} was written by {len(resume['rng'])} processes; "
                                 f"resume with the same number (this run has {world})")
            if resume["data"]["examples_seen"] != step * per_step:
                raise ValueError(f"--resume: {ckpt_path} was written with another batch size or accumulation")
        report = teamlora.parameter_report(model)
        raw = model  # checkpoints come from the unwrapped, uncompiled module
        if args.compile:
            model = torch.compile(model)
        if world > 1:
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
        torch.manual_seed(args.seed + rank)  # dropout differs per rank; data order comes from the sampler
        if resume:
            torch.set_rng_state(resume["rng"][rank]["cpu"])
            if device.type == "cuda":
                torch.cuda.set_rng_state(resume["rng"][rank]["cuda"])

        def batches(start):
            """Micro-batches of exactly batch_size examples from example `start` of this rank's stream
            of concatenated epochs (a batch may span two epochs), so a step count is a data position."""
            epoch, pos = divmod(start, len(sampler))
            chunk = []
            while True:
                for j in sampler.epoch(epoch)[pos:]:
                    chunk.append(j)
                    if len(chunk) == args.batch_size:
                        yield data.collate([ds[i] for i in chunk], tok.pad_id)
                        chunk = []
                epoch, pos = epoch + 1, 0

        if main:
            out.mkdir(parents=True, exist_ok=True)
            print(f"{args.method}: {report['trainable']:,} trainable of {report['base']:,} base parameters "
                  f"({report['trainable_pct']:.3f}%; router {report['router']:,}); {steps} steps x {world} ranks x "
                  f"{per_step} examples; {len(train_set)} train / {len(test_set)} test examples, tasks {ds.tasks}")
        log = None
        if main:  # on resume, drop records of steps after the checkpoint: they are about to be redone
            old = (out / "log.jsonl").read_text().splitlines() if resume and (out / "log.jsonl").exists() else []
            kept = "".join(r + "\n" for r in old if json.loads(r)["step"] <= step)
            evaluation.atomic_save(kept, out / "log.jsonl")
            log = open(out / "log.jsonl", "a")
        stream = batches(step * per_step)
        model.train()
        bar = tqdm(total=steps, initial=step, desc=args.method, disable=not main, dynamic_ncols=True)
        n_tokens_total = 0
        while step < steps:
            t0 = time.time()
            micro = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(args.grad_accum)]
            n_tok = torch.tensor(float(sum((b["targets"] != data.IGNORE).sum() for b in micro)), device=device)
            n_in = torch.tensor(float(sum(b["tokens"].numel() for b in micro)), device=device)
            if world > 1:
                dist.all_reduce(n_tok), dist.all_reduce(n_in)
            per_task, aux = 0, 0.0
            for i, b in enumerate(micro):
                # Gradients sync across ranks only on the last micro-step, switched before its forward.
                sync = world == 1 or i == len(micro) - 1
                with (nullcontext() if sync else model.no_sync()):
                    pt, a = micro_step(model, b, n_tok, args, autocast)
                per_task, aux = per_task + pt, aux + a / len(micro)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, args.clip if args.clip > 0 else float("inf"))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            if world > 1:
                dist.all_reduce(per_task), dist.all_reduce(aux)
                aux = aux / world
            dt = time.time() - t0
            train_time += dt
            n_tokens_total += n_in.item()
            loss = (per_task[0].sum() / per_task[1].sum()).item()
            if main:
                rec = {"step": step, "loss": loss, "aux": float(aux), "lr": sched.get_last_lr()[0],
                       "grad_norm": grad_norm.item(), "tokens_per_s": n_in.item() / dt,
                       "task_loss": {t: (per_task[0, i] / per_task[1, i]).item()
                                     for i, t in enumerate(ds.tasks) if per_task[1, i] > 0}}
                log.write(json.dumps(rec) + "\n")
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{rec['lr']:.1e}")
            if step % args.save_every == 0 or step == steps:
                save_checkpoint(raw, opt, sched, step, train_time, args, ckpt_path, world, device)
        bar.close()
        if main:
            log.close()
            summary = {"method": args.method, "rank": args.rank, "experts": args.experts,
                       "router": args.router, "trainable": report["trainable"],
                       "trainable_pct": report["trainable_pct"], "router_params": report["router"],
                       "train_time_s": train_time, "tokens_per_s": n_tokens_total / max(train_time, 1e-9),
                       "steps": steps, "final_loss": loss if steps else None, "seed": args.seed,
                       "targets": args.targets, "alpha": args.alpha, "lr": args.lr, "base": args.base_path,
                       "data": args.data}
            evaluation.atomic_save(json.dumps(summary, indent=1), out / "summary.json")
        if not args.no_eval:
            results = evaluation.evaluate(raw, tok, test_set, args.seq_len, limit=args.eval_limit)
            if main:
                evaluation.atomic_save(json.dumps(results, indent=1), out / "eval.json")
                print(evaluation.format_table(results))
                print(f"{args.method}: {report['trainable']:,} trainable parameters ({report['trainable_pct']:.3f}% "
                      f"of the base; router {report['router']:,}); trained {train_time:.0f} s; -> {out}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def save_checkpoint(model, opt, sched, step, train_time, args, path, world, device):
    """Adapters only (or the whole model for --method full) plus the state to resume exactly."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    rngs = [rng]
    if world > 1:  # every rank's dropout stream is saved, so a resume continues each one
        flat = torch.cat(list(rng.values())).to(device)  # RNG states are uint8 tensors of fixed size
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        sizes = [v.numel() for v in rng.values()]
        rngs = [dict(zip(rng, p.cpu().split(sizes))) for p in parts]
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    config = {k: v for k, v in vars(args).items() if k not in ("param_dtype",)}
    config["base"] = args.base_path
    state = {"config": config, "step": step, "train_time": train_time, "optimizer": opt.state_dict(),
             "scheduler": sched.state_dict(), "rng": rngs,
             "data": {"examples_seen": step * args.batch_size * args.grad_accum}}
    if args.method == "full":
        state["model"] = model.state_dict()
    else:
        state["adapters"] = teamlora.adapter_state_dict(model)
    evaluation.atomic_save(state, path)


if __name__ == "__main__":
    train(get_args())
