"""Plumbing that train.py and eval.py share: processes, devices, files, the checkpoint format,
and turning a user's mistake into one line instead of a traceback.

    from common import cli
    if __name__ == "__main__":
        cli(main)          # main(argv) parses its own flags

A train.py output directory OUT holds (save_checkpoint and read_checkpoint, side by side below):

    adapters.safetensors   the trained tensors: teamlora.adapter_state_dict (--method full: the
                           whole model's); metadata "step" and "adapter" (JSON)
    checkpoint.pt          torch.load(..., weights_only=True): what resuming and rebuilding need
                           config     train.py's flags exactly as parsed (presets resolved)
                           adapter    teamlora.add_adapters' keyword arguments (None for full)
                           base_path  the base model's directory as an absolute path (config's
                                      "base" keeps it as the user gave it: a Hub id, a relative path)
                           data_path  the mixture's absolute path (None: the built-in one); config's
                                      "data" keeps it as given (run_data says which one is read)
                           step, train_time, tokens, loss   progress: steps, seconds, input
                                      tokens of all ranks, the last step's loss
                           skipped    steps skipped for a non-finite loss (--skip-nonfinite)
                           optimizer, scheduler, rng (one dict per rank; a resume onto another
                                      number of ranks starts new dropout streams)
                           data       {"epoch", "offset", "examples_seen"}: where all ranks
                                      together stand in the global stream of examples (runs.py's
                                      example_stream), so any number of ranks can continue it

Exit statuses (cli): 0 done; 1 a bug (its traceback); 2 a user's error; and a run that stopped
itself, one line saying why: 3 stopped on SIGTERM/SIGUSR1 with a checkpoint of the step it
finished (--resume continues); 4 a non-finite loss or gradient norm (nothing of that step applied);
5 another rank died or did not answer within --timeout; 6 a file could not be written; 141 the
reader of the output stopped early (`| head`: quietly, as SIGPIPE ends other programs).
"""
import gc
import json
import logging
import os
import signal
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import teamlora
from data import DataError
from model import CheckpointError, Transformer, checkpoint_args, load_tokenizer, resolve_base

ADAPTERS, CHECKPOINT = "adapters.safetensors", "checkpoint.pt"
# Everything train.py and eval.py write into OUT: what train.py --overwrite removes first.
OUTPUTS = (ADAPTERS, CHECKPOINT, "log.jsonl", "summary.json", "eval.json", "predictions.jsonl", "routing.png",
           "routing_layers.png", "interaction.png")
# train.py flags that say how a run is carried out, not what it computes: a resume may change
# them, and eval.py --compare ignores them (and the seed) when it groups runs into one setup.
RUN_ONLY = ("out", "resume", "overwrite", "device", "compile", "fsdp", "grad_checkpoint", "save_every", "eval_limit",
            "no_eval", "timeout", "skip_nonfinite")

# ----------------------------------------------------------------------------- user errors


class UserError(ValueError):
    """A flag, path or run directory that cannot be used (a user's mistake, not a bug)."""


# Anything else is a bug and keeps its traceback. FileNotFoundError: a path the user named is missing.
USER_ERRORS = (UserError, DataError, CheckpointError, FileNotFoundError)


class Stop(Exception):
    """A run that stopped itself: its message is the one line printed, status the exit status."""
    status = 1
    once = False  # True: every rank stops alike (decided through a collective), rank 0 alone says so


class Preempted(Stop):
    status, once = 3, True


class Diverged(Stop):
    status, once = 4, True


class RankLost(Stop):
    status = 5


class WriteFailed(Stop):
    status = 6


def cli(main, argv=None):
    """Run main(argv); a user error prints `error: <message>` on one line and exits with status 2,
    a Stop prints its line and exits with its status (the module docstring lists them). Output piped
    into a reader that stops early (`| head`) ends the program quietly."""
    try:
        result = main(argv)
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
        return result
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Stop as e:
        if not e.once or os.environ.get("RANK", "0") == "0":  # the process group is gone by now
            print(e, file=sys.stderr)
        sys.exit(e.status)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the exit's flush fails again
        sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a program a closed pipe ended


# ----------------------------------------------------------------------------- processes and devices


def default_device(device=None):
    """The device to run on: `device` if given, else cuda when there is a GPU, else cpu."""
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def check_device(name):
    """Why torch cannot run this project on the device a --device flag names; None when it can
    (and for None: the default device always works)."""
    if name is None:
        return None
    try:
        kind = torch.device(name).type
    except RuntimeError:
        return f"{name!r} is not a device torch knows (cpu, cuda or cuda:N)"
    if kind == "cuda" and not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else "no GPU is visible to torch"
        return f"{name}: {build}; use cpu, or leave --device out"
    if kind == "cuda" and ":" in name and torch.device(name).index >= torch.cuda.device_count():
        return f"{name}: torch sees {torch.cuda.device_count()} GPU(s)"
    if kind not in ("cpu", "cuda"):
        return f"{name}: this project runs on cpu or cuda"
    return None


@contextmanager
def distributed(device=None, timeout_min=30.0):
    """with distributed() as (rank, world, device): under torchrun (RANK set) one process per GPU
    with nccl, or gloo on CPUs; collectives give up after timeout_min minutes on a dead rank.
    Without torchrun: one process, no process group. The group is destroyed however the body ends."""
    if "RANK" not in os.environ:
        yield 0, 1, default_device(device)
        return
    dev = torch.device("cpu")
    bound = {}
    if default_device(device).type == "cuda":
        dev = torch.device(f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(dev)
        bound = {"device_id": dev}  # binds nccl to this GPU now, so its first barrier cannot land on GPU 0
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timedelta(minutes=timeout_min), **bound)
    try:
        yield dist.get_rank(), dist.get_world_size(), dev
    finally:
        # A finished DDP wrapper lingers in a reference cycle; destroying the group under it makes
        # some processes abort at exit ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


# A scheduler asks a job to stop before it kills it: SLURM sends SIGTERM and, after a grace
# period, SIGKILL; --signal=USR1@T sends SIGUSR1 T seconds before the time limit.
STOP_SIGNALS = [getattr(signal, s) for s in ("SIGTERM", "SIGUSR1") if hasattr(signal, s)]  # no SIGUSR1 on Windows
stop_signal = []  # the stop signals this process received; train.py's loop acts on them


def on_stop_signal(signum, frame):
    """Only records the signal; train.py stops at its next step boundary. Nothing else runs here,
    so a second signal, during the checkpoint's write, cannot interrupt that write."""
    stop_signal.append(signal.Signals(signum).name)


def catch_stop_signals():
    """From now on, for the rest of the process, SIGTERM and SIGUSR1 ask the run to stop (a
    scheduler's warning before SIGKILL) instead of killing it: also while it exits, so that a
    launcher tearing the ranks down does not turn a run's exit status into 143."""
    for s in STOP_SIGNALS:
        signal.signal(s, on_stop_signal)
        if hasattr(signal, "siginterrupt"):
            signal.siginterrupt(s, False)  # a read or write under way goes on instead of failing (EINTR)


def is_main():
    """True on the process that logs and writes files (rank 0, or the only process)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def collective_failed(e):
    """Whether e is what a collective raises when another rank died or did not answer in time:
    torch's DistError, or the plain RuntimeError that gloo raises, naming itself."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and "gloo" in str(e))


def all_reduce(t, device):
    """t summed over ranks, as a tensor on `device` (nccl reduces GPU tensors only); t if not distributed."""
    if not dist.is_initialized():
        return t
    t = t.to(device)
    dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- files


def save_safetensors(tensors, path, metadata=None):
    """safetensors.torch.save_file, then the mode every other output has (0666 less the umask):
    safetensors writes through a temporary file of its own, created 0600, and renames it."""
    save_file(tensors, path, metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _write_tmp(obj, path, metadata=None):
    """Write obj next to path under a temporary name: text (a str), a safetensors file (path ends
    in .safetensors: a dict of tensors) or any torch object. Returns the temporary path; a write
    that fails (no space, no permission) removes it and raises WriteFailed naming path."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(obj, str):
            tmp.write_text(obj)
        elif path.suffix == ".safetensors":
            save_safetensors(obj, tmp, metadata)
        else:
            with open(tmp, "wb") as f:  # through Python's file, a failed write names its cause (ENOSPC...)
                torch.save(obj, f)
    except (OSError, RuntimeError, SafetensorError) as e:  # RuntimeError: torch's own writer
        tmp.unlink(missing_ok=True)
        raise write_failed(path, e) from e
    return tmp


def _rename(tmp, path):
    try:
        os.replace(tmp, path)
    except OSError as e:
        raise write_failed(path, e) from e


def write_failed(path, e):
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return WriteFailed(f"error: cannot write {path}: {reason}; nothing in {path.parent} is half-written")


def atomic_save(obj, path):
    """Write obj (see _write_tmp) under a temporary name, then rename: a crash mid-write never
    leaves a broken file, and a reader never sees half of one."""
    path = Path(path)
    tmp = _write_tmp(obj, path)
    try:
        _rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after a rename; left behind by a failed one


# ----------------------------------------------------------------------------- the checkpoint format


def trained_tensors(model, adapter):
    """What adapters.safetensors holds: the adapter tensors, or for full fine-tuning (adapter None)
    every tensor of the model, a tied output layer once (safetensors stores no shared tensors)."""
    if adapter is not None:
        return teamlora.adapter_state_dict(model)
    state = model.state_dict()
    if model.args.tie_embeddings:
        state.pop("output.weight")
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_checkpoint(out, tensors, state):
    """Write OUT/adapters.safetensors (tensors) and OUT/checkpoint.pt (state), both complete under
    temporary names before either is renamed; read_checkpoint mends a crash between the renames."""
    out = Path(out)
    meta = {"step": str(state["step"]), "adapter": json.dumps(state["adapter"])}
    tmp_tensors = _write_tmp(tensors, out / ADAPTERS, meta)
    try:
        tmp_state = _write_tmp(state, out / CHECKPOINT)
        _rename(tmp_tensors, out / ADAPTERS)
    except BaseException:  # nothing renamed yet: the previous pair stays whole, without leftovers
        tmp_tensors.unlink(missing_ok=True)
        (out / (CHECKPOINT + ".tmp")).unlink(missing_ok=True)
        raise
    _rename(tmp_state, out / CHECKPOINT)  # if this one fails, read_checkpoint mends the pair from the .tmp


def _torch_load(path):
    """mmap: a tensor is read from the file when it is used, and pages the ranks of a node read are
    shared, so no rank holds a private copy of a 7B run's optimizer state just to resume."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable checkpoint ({e})") from e


def read_checkpoint(out):
    """checkpoint.pt's dict plus "tensors" (adapters.safetensors). A checkpoint.pt of the older
    single-file format (adapters inside, flat config) comes back in the same shape, with "legacy"."""
    out = Path(out)
    if not (out / CHECKPOINT).exists():
        raise CheckpointError(f"{out}: no {CHECKPOINT} (is it a train.py output directory?)")
    ckpt = _torch_load(out / CHECKPOINT)
    if "adapter" not in ckpt:
        return _legacy(ckpt)
    try:  # safetensors maps the file: each tensor is a view of it, read when used
        with safe_open(str(out / ADAPTERS), framework="pt") as f:
            step, tensors = int(f.metadata()["step"]), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise CheckpointError(f"{out / ADAPTERS}: missing or unreadable ({e})") from e
    if step != ckpt["step"]:  # save_checkpoint died between its renames: the new state is still in .tmp
        pending = out / (CHECKPOINT + ".tmp")
        ckpt = _torch_load(pending) if pending.exists() else ckpt
        if step != ckpt["step"]:
            raise CheckpointError(f"{out}: {ADAPTERS} is from step {step}, {CHECKPOINT} from step {ckpt['step']}")
    return {**ckpt, "tensors": tensors}


def _legacy(ckpt):
    """The format before adapters.safetensors: config held the adapter flags and the resolved base."""
    config = ckpt["config"]
    adapter = None
    if config["method"] != "full":
        adapter = {k: config[k] for k in ("method", "rank", "experts", "alpha", "dropout", "targets")}
        if config.get("router"):  # None meant "the method's own", which add_adapters picks
            adapter["router"] = config["router"]
    tensors = ckpt["model"] if adapter is None else ckpt["adapters"]
    return {**ckpt, "adapter": adapter, "base_path": config["base"], "tensors": tensors, "legacy": True}


def base_dir(name, pretrain_steps=700):
    """The directory of a --base: a checkpoint directory, a Hub id fetched into the Hugging Face
    cache, or for "tiny" the tiny base of pretrain_steps steps once built (model.resolve_base;
    train.py builds it first with pretrain.py)."""
    return resolve_base(name, pretrain_steps)


def check_base(path):
    """(tokenizer, ModelArgs) of a base directory, read without a single weight: the tokenizer
    loads, the config is one model.py supports, the weight files are there. Entry points call it
    before Transformer.from_pretrained, which takes minutes for a 7B base."""
    return load_tokenizer(path), checkpoint_args(path)


def run_data(ckpt):
    """The mixture a run trained on, for reading it again: the path as given while it still names
    the same place from here (or the run stored none), else the absolute path stored at training
    while that exists (run from another directory), else as given. None: the built-in mixture."""
    given, path = ckpt["config"].get("data"), ckpt.get("data_path")
    if given is None or path is None or Path(given).resolve() == Path(path) or not Path(path).exists():
        return given
    return path


def open_run(out_dir, base=None):
    """(checkpoint, base directory, tokenizer) of a train.py output directory, its base checked
    (check_base) but not loaded. base: where the base model is now, if it moved since training
    (a --base value). Else the absolute path stored at training, then the base as the user gave
    it: a relative path from here, a Hub id fetched again."""
    ckpt = read_checkpoint(out_dir)
    path = Path(ckpt["base_path"])
    steps = ckpt["config"].get("pretrain_steps", 700)  # which tiny base, for "tiny"
    if base:
        path = base_dir(base, steps)
    elif not path.is_dir():  # moved, or trained on another machine
        try:
            path = base_dir(ckpt["config"]["base"], steps)
        except CheckpointError as e:
            raise CheckpointError(f"{out_dir}: its base is gone ({e}); say where it is now with --base") from None
    return ckpt, path, check_base(path)[0]


# ----------------------------------------------------------------------------- the base, quantized or not

QUANTIZE = ("nf4", "int8")  # train.py --quantize: bitsandbytes' Linear4bit (NF4) or Linear8bitLt (LLM.int8())


def load_base(path, dtype=torch.float32, device="cpu", quantize=None):
    """Transformer.from_pretrained, its block linear layers quantized if asked (QLoRA-style; a run's
    config["quantize"]). A quantized base is read into CPU memory in float first, each layer is then
    quantized as it moves to `device`: the device never holds the float base."""
    if quantize is None:
        return Transformer.from_pretrained(path, dtype=dtype, device=device)
    model = Transformer.from_pretrained(path, dtype=dtype, device="cpu")
    return quantize_base(model, quantize, device, compute_dtype=dtype).to(device)


def quantize_base(model, kind, device, compute_dtype=torch.float32):
    """Replace, in place, every nn.Linear of the transformer blocks (attention and FFN, not the
    embeddings or the output layer, as QLoRA does) by bitsandbytes' frozen quantized layer on device:
    nf4  Linear4bit, 4-bit NormalFloat in blocks of 64 with quantized block scales (QLoRA's double
         quantization): 0.5 byte per weight + ~0.127 bit of scales; computes in compute_dtype
    int8 Linear8bitLt (LLM.int8()): 1 byte per weight + one float32 scale per row; outlier inputs
         (|x| > 6, transformers' default threshold) in 16 bits
    bitsandbytes is what QLoRA and Hugging Face (transformers' BitsAndBytesConfig, PEFT) use, and it
    runs both on CPUs too. Returns the model."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise UserError(f"--quantize {kind} needs bitsandbytes: pip install bitsandbytes") from None
    for name, linear in [(n, m) for n, m in model.layers.named_modules() if type(m) is torch.nn.Linear]:
        shape = (linear.in_features, linear.out_features, linear.bias is not None)
        w = linear.weight.data
        if kind == "nf4":
            q = bnb.nn.Linear4bit(*shape, compute_dtype=compute_dtype, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", module=q)
        else:  # bitsandbytes would log on every forward that int8 inputs pass through float16
            logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
            q = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False, threshold=6.0, device="meta")
            q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
        q.bias = linear.bias
        parent, _, child = name.rpartition(".")
        setattr(model.layers.get_submodule(parent), child, q.to(device))  # .to quantizes
    return model


def load_model(ckpt, path, device="cpu", dtype=torch.float32):
    """The base model at path (quantized as the run's was) with a checkpoint's trained tensors
    (adapters, or the fully fine-tuned weights), in eval mode."""
    model = load_base(path, dtype, device, ckpt["config"].get("quantize"))  # older runs: no "quantize"
    try:
        if ckpt["adapter"] is None:
            missing, unexpected = model.load_state_dict(ckpt["tensors"], strict=False)
            if unexpected or set(missing) - {"output.weight"}:  # a tied output layer is stored once
                raise ValueError(f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        else:
            teamlora.add_adapters(model, **ckpt["adapter"])
            teamlora.load_adapter_state_dict(model, ckpt["tensors"])
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"the run's trained tensors do not fit the base {path}: {e}") from e
    return model.to(device).eval()


def load_run(out_dir, device="cpu", dtype=torch.float32, base=None):
    """(model, tokenizer, config) of a train.py output directory: open_run, then load_model."""
    ckpt, path, tok = open_run(out_dir, base)
    return load_model(ckpt, path, device, dtype), tok, ckpt["config"]
