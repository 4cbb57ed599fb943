"""A train.py run as it stands in its output directory OUT: a new run refused where OUT holds one,
--overwrite clearing it, --resume reading the run's flags and state back, where the run stands in
the stream of examples (so any number of ranks continues it), the checkpoints it saves, and what
each step leaves in log.jsonl. train.py calls these; the checkpoint's format is common.py's.

    python -m pytest -q tests/test_train.py tests/test_faults.py   # resume, preemption, divergence
"""
import argparse
import json
import math
from pathlib import Path

import torch
import torch.distributed as dist

import common
import data
import sharding
import teamlora
from common import UserError


# ----------------------------------------------------------------------------- a new run, --overwrite

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


# ----------------------------------------------------------------------------- resuming

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
    try:  # a --base of another shape than the run's is the user's mistake, not a bug
        if sharded:
            sharding.load_full(model, ckpt["tensors"])  # a tied output layer is stored once, as its embedding
        elif adapter is None:
            model.load_state_dict(ckpt["tensors"], strict=False)  # a tied output layer is stored once
        else:
            teamlora.load_adapter_state_dict(model, ckpt["tensors"])
    except (ValueError, RuntimeError) as e:
        raise UserError(f"--resume: the run's trained tensors do not fit this base ({str(e).splitlines()[0]})") from None
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


# ----------------------------------------------------------------------------- where the run stands in the data

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


# ----------------------------------------------------------------------------- saving

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


# ----------------------------------------------------------------------------- the step's record, log.jsonl

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
