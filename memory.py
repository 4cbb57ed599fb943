"""What fits: peak memory per GPU of a training run, computed before renting GPUs.

    python memory.py --base llama2-7b                  # the README table: LLaMA-2-7B, the paper preset
    python memory.py --base llama2-70b --world 8
    python memory.py --base /ckpt/Llama-2-7b-hf --batch-size 2 --seq-len 2048   # any base's config
    python -m pytest -q tests/test_memory.py           # the formula against measured CPU runs

Computed, not measured on a GPU. Parameter counts come from the model built on the meta device
(model.Transformer + teamlora.add_adapters: no storage). Activations come from a per-token count of
the tensors autograd saves for backward, op by op (saved_per_token below), which
tests/test_memory.py checks against torch.autograd.graph.saved_tensors_hooks on small CPU models.

The run modelled is train.py's on GPUs: the base in bf16 under bf16 autocast (full fine-tuning:
float32 weights under autocast, as train.py builds it), adapters and AdamW state in float32, FFN
adapters (w1 w2 w3), the paper preset by default (4 x 1024 tokens per micro-step, 8 micro-steps:
the gradients live through the whole step). Peak = weights + gradients (+ DDP's buckets, a second
copy of the gradients) + AdamW's two moments + autocast's bf16 copies of float32 weights + the
micro-step's saved activations + the loss's transient (N, vocab) float32 buffers. FSDP is taken as
fully_shard per block and on the root with MixedPrecisionPolicy(param_dtype=bf16): weights,
gradients and moments divided by the world size, plus two blocks gathered in bf16 (the one running
and the one prefetched), no autocast copies. Not counted: the CUDA context and NCCL buffers (about
1 GB), allocator fragmentation, and attention's math fallback (flash attention is assumed: no
(T, T) matrix is kept). Every position is taken as a loss target (an upper bound: answer-only loss
runs the output layer on fewer positions).
"""
import argparse
import math
import warnings
from dataclasses import replace

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; unused here
import torch  # noqa: E402

import common
import teamlora
from common import cli
from model import ModelArgs, Transformer, ffn_hidden_dim
from train import PRESETS

SHAPES = {  # Meta's published configurations (params.json)
    "llama2-7b": ModelArgs(dim=4096, n_layers=32, n_heads=32, vocab_size=32000),
    "llama2-70b": ModelArgs(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=32000,
                            ffn_dim_multiplier=1.3, multiple_of=4096),
}
# The paper's main table (METHOD.md's rank convention: r per expert, k = 4), and full fine-tuning.
SETUPS = [("LoRA r32", "lora", 32, 1), ("LoRA r128", "lora", 128, 1), ("MoELoRA k4 r32", "moelora", 32, 4),
          ("HydraLoRA k4 r32", "hydralora", 32, 4), ("TeamLoRA k4 r32", "teamlora", 32, 4), ("full", "full", 0, 0)]
FFN = ("w1", "w2", "w3")
BF16, F32 = 2, 4  # bytes
# train.py --quantize nf4, per block weight: 4 bits, an 8-bit absmax per 64 weights and a float32 scale
# per 256 such blocks (QLoRA's double quantization). The embeddings, norms and output layer stay bf16.
NF4 = 0.5 + 1 / 64 + F32 / (64 * 256)


def parameter_counts(args: ModelArgs, method, rank, experts):
    """{"base", "trainable", "linear" (weights of nn.Linear layers), "block_linear" (those of the
    blocks: what --quantize quantizes), "block" (one block's)} from the model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(args)
        if method != "full":
            teamlora.add_adapters(model, method, rank, experts, targets=FFN)
    report = teamlora.parameter_report(model)
    trainable = report["total"] if method == "full" else report["trainable"]
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    block_linear = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, torch.nn.Linear))
    block = sum(p.numel() for p in model.layers[0].parameters())
    return {"base": report["base"], "trainable": trainable, "linear": linear, "block_linear": block_linear,
            "block": block}


def saved_per_token(args: ModelArgs, method, rank, experts, dropout=0.05, device="cuda", targets=1.0,
                    grad_checkpoint=False):
    """Bytes autograd saves for backward per token of a micro-step (targets: the share of positions
    that are loss targets), op by op as model.py and teamlora.py compute them under bf16 autocast.
    With grad_checkpoint: what stays saved in forward (each block's input); the block recomputed in
    backward is `block_saved_per_token`."""
    d, H, V = args.dim, ffn_hidden_dim(args), args.vocab_size
    s = F32 if method == "full" else BF16  # the residual stream's dtype: the weights' (embedding output)
    final = 1 + targets * (norm(d, method) + (BF16 * d if method == "full" else 0) + F32 * V + 8)  # keep mask; norm, logits
    if method == "full":
        final += 8  # the embedding's token ids
    if grad_checkpoint:
        return args.n_layers * s * d + final
    first = block_saved_per_token(args, method, rank, experts, dropout, device, first=True)
    return first + (args.n_layers - 1) * block_saved_per_token(args, method, rank, experts, dropout, device) + final


def norm(d, method):
    """RMSNorm: its float32 input and 1 / rms; with a trainable weight also the normalised x."""
    return F32 * d + F32 + (F32 * d if method == "full" else 0)


def block_saved_per_token(args, method, rank, experts, dropout=0.05, device="cuda", first=False):
    """One block's saved bytes per token. The first block's attention and norms see no gradient
    when only FFN adapters train (the frozen embedding needs none), so autograd saves nothing there."""
    d, H, hd = args.dim, ffn_hidden_dim(args), args.dim // args.n_heads
    kv = (args.n_kv_heads or args.n_heads) * hd
    c = BF16  # autocast's compute dtype
    # attention: RoPE's complex cos/sin for q and k; SDPA keeps q, k, v, its output and logsumexp
    attn = 8 * hd + c * (2 * d + 2 * kv) + F32 * args.n_heads
    ffn = 3 * c * H  # w1's output (silu's input), silu's output, w3's output (the product's inputs)
    if method == "full":  # every nn.Linear keeps its bf16 input: autocast casts the float32 stream once per layer
        return 2 * norm(d, "full") + attn + c * 3 * d + c * 2 * d + ffn + c * H
    if not first:
        attn += 2 * norm(d, method)
    else:
        attn = 0
    ffn += BF16 * d + c * H  # the inputs of w1/w3 (one tensor) and of w2: the routers and A's read them
    for d_in, d_out, grad_in in ((d, H, not first), (d, H, not first), (H, d, True)):  # w1, w3, w2
        ffn += adapter_saved(method, rank, experts, d_in, d_out, dropout, device, grad_in)
    return attn + ffn


def adapter_saved(method, r, k, d_in, d_out, dropout, device, grad_in):
    """One adapted linear's own saved bytes per token, beyond its input. grad_in: whether the input
    needs a gradient (nn.Dropout saves its mask only then)."""
    c = BF16
    if method in ("lora", "teamlora"):  # dropout_linear: a bool mask (A drop(x) is recomputed)
        own = d_in if dropout > 0 else 0
        if method == "lora":
            return own + c * r  # s A drop(x), B's input
        # z, s E w and their product (B's input), (k r) each; the shapley router in float32:
        # phi, M phi, |M phi|, k M phi (k each) and t, |t|, d and its three steps (1 each)
        return own + 3 * c * k * r + F32 * (3 * k + 6)
    # moelora, hydralora: nn.Dropout's mask (bf16 scale on a CPU, bool on a GPU) and drop(x); the
    # softmax router's output (float32) and its bf16 copy g; per expert its (d_out) output
    drop = ((c if device == "cpu" else 1) * d_in * grad_in + BF16 * d_in) if dropout > 0 else 0
    ranks = k * c * r if method == "moelora" else c * r  # each expert's A x, or the one shared A x
    return drop + F32 * k + c * k + ranks + k * c * d_out


def peak(args: ModelArgs, method, rank, experts, world=8, fsdp=False, grad_checkpoint=False,
         batch_size=4, seq_len=1024, dropout=0.05, counts=None, nf4=False):
    """Bytes per GPU by component (see the module docstring), and "total". counts: parameter_counts'.
    nf4: the blocks' weights in 4 bits (train.py --quantize nf4, DDP); activations as for a bf16 base
    (a frozen 4-bit layer saves only its packed weight for backward, as a frozen nn.Linear its weight)."""
    n = counts or parameter_counts(args, method, rank, experts)
    full = method == "full"
    shard = world if fsdp else 1
    tokens = batch_size * seq_len
    base = n["base"] * (F32 if full else BF16) - (n["block_linear"] * (BF16 - NF4) if nf4 else 0)
    out = {"weights": (base + (0 if full else n["trainable"] * F32)) / shard,
           "gradients": n["trainable"] * F32 / shard,
           "ddp buckets": 0 if fsdp else n["trainable"] * F32,
           "adamw": 2 * n["trainable"] * F32 / shard,
           # bf16 copies autocast makes of float32 weights, kept for backward (FSDP gathers bf16)
           "autocast copies": 0 if fsdp else BF16 * (n["linear"] if full else n["trainable"]),
           "gathered blocks": 2 * BF16 * n["block"] if fsdp else 0,
           "activations": tokens * saved_per_token(args, method, rank, experts, dropout, "cuda", 1.0, grad_checkpoint),
           "loss transient": 2 * F32 * args.vocab_size * tokens}
    if grad_checkpoint:  # backward recomputes one block at a time
        out["activations"] += tokens * block_saved_per_token(args, method, rank, experts, dropout)
    out["total"] = sum(out.values())
    return out


def shape_of(base):
    """ModelArgs of a SHAPES name or a checkpoint directory / Hub id (its config; no weights read)."""
    if base in SHAPES:
        return SHAPES[base]
    return common.check_base(common.base_dir(base))[1]


def table(args: ModelArgs, world, batch_size, seq_len, dropout):
    """Rows (setup, trainable %, [DDP, DDP + ckpt, FSDP, FSDP + ckpt] in GB)."""
    rows = []
    for label, method, rank, experts in SETUPS:
        n = parameter_counts(args, method, rank, experts)
        cells = [peak(args, method, rank, experts, world, fsdp, ckpt, batch_size, seq_len, dropout, n)["total"] / 1e9
                 for fsdp in (False, True) for ckpt in (False, True)]
        rows.append((label, 100.0 * n["trainable"] / n["base"], cells))
    return rows


def main(argv=None):
    paper = PRESETS["paper"]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="llama2-7b", help=f"{' or '.join(SHAPES)}, or a checkpoint directory / Hub id")
    p.add_argument("--world", type=int, default=8, help="GPUs (FSDP divides the states by it)")
    p.add_argument("--batch-size", type=int, default=paper["batch_size"], help="examples per GPU per micro-step")
    p.add_argument("--seq-len", type=int, default=paper["seq_len"])
    p.add_argument("--dropout", type=float, default=0.05)
    a = p.parse_args(argv)
    margs = replace(shape_of(a.base), max_seq_len=a.seq_len)
    rows = table(margs, a.world, a.batch_size, a.seq_len, a.dropout)
    print(f"{a.base}: peak GB per GPU, {a.batch_size} x {a.seq_len} tokens per micro-step, bf16 autocast, AdamW, "
          f"FFN adapters; FSDP over {a.world} GPUs (computed, not measured)")
    head = f"| setup | trainable % | DDP | DDP + ckpt | FSDP | FSDP + ckpt |"
    print(head + "\n|" + "---|" * 6)
    for label, pct, cells in rows:
        print(f"| {label} | {pct:.2f} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    print(f"\nwith --quantize nf4 (the blocks' weights at {NF4:.3f} byte; DDP, as train.py runs it):")
    print("| setup | DDP | DDP + ckpt |\n|---|---|---|")
    for label, method, rank, experts in SETUPS[:-1]:  # full fine-tuning cannot train quantized weights
        n = parameter_counts(margs, method, rank, experts)
        cells = [peak(margs, method, rank, experts, a.world, False, ckpt, a.batch_size, a.seq_len, a.dropout, n,
                      nf4=True)["total"] / 1e9 for ckpt in (False, True)]
        print(f"| {label} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return rows


if __name__ == "__main__":
    cli(main)
