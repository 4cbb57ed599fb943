"""Efficiency benchmark: TeamLoRA against LoRA, MoELoRA and HydraLoRA, side by side in one run.

    python bench.py --layer                      # one adapted FFN linear layer: forward + backward
    python bench.py                              # a whole LLaMA: train step, prefill, decode, memory
    python bench.py --experts 4 --repeats 3 --json out/bench.json
    python bench.py --shape smollm2 --experts 4 --batch 8 --seq 128   # SmolLM2-135M's shape, random weights
    python -m pytest -q tests/test_bench.py

A shared machine drifts, so no method is timed in a block of its own: every round runs each
configuration once (the starting one rotates), after warm-up rounds, and the tables show medians
over --repeats rounds and ratios within the run. Each group of rows has k experts of rank r and is
compared with MoELoRA k r (the published loop over experts, the paper's baseline: "xMoE") and with
LoRA of the same total rank k r ("xLoRA"). "MoELoRA fused*" is the same dense MoELoRA computed the
way TeamLoRA is (the A_i stacked, the expert weights applied in the rank space; in teamlora.py that
is `teamlora` with the softmax router): it separates what the fused form buys from what TeamLoRA's
structure buys.

teamlora.py's MoELoRA and HydraLoRA draw one dropout mask per layer and HydraLoRA computes
A drop(x) once for all its heads. The published implementations do more: MoELoRA draws a mask
per expert, HydraLoRA recomputes A drop(x), with a mask of its own, inside its loop over heads
(k masks, k A-products). The rows marked "(published)" time that (bench-only classes below); the
xMoE reference stays teamlora.py's cheaper MoELoRA.

Defaults: on CPU, float32, the layer 1024 -> 2752 over 16 x 128 tokens, and the project's tiny
LLaMA shape (dim 256, 4 layers, 4 heads, FFN 688, vocab 4096, untied) at batch 16 x 128.
`--shape smollm2` is SmolLM2-135M instead (dim 576, 30 layers, 9 query / 3 kv heads, FFN 1536,
vocab 49,152, tied embeddings; the layer 576 -> 1536); flags given explicitly still win. On a GPU,
bf16 base weights under autocast (adapters stay float32), LLaMA-7B layer shapes (dim 4096, FFN 11008,
32 heads, vocab 32000) but only 4 layers, 8 x 1024 tokens for the layer, batch 4 x 1024 for the
model. Weights are random: speed does not depend on their values. Adapters go on the FFN (w1 w2 w3).

What is timed. Layer: forward and backward of one adapted linear layer whose input requires grad,
so backward computes dX as it would inside a network (the "frozen base" row does only that: the
floor). Model: a train step (forward, full-vocabulary cross-entropy, backward, AdamW on the
adapters, dropout --dropout as in train.py), a prefill of
the batch, and a decoding step with the KV cache (one new token for every sequence of the batch,
greedy, a fixed --new-tokens steps after an untimed prefill; "decode ms/tok" is ms per step).

Training memory: on a GPU, torch.cuda.max_memory_allocated during one step, plus what stays
allocated (parameters, AdamW's two moments), with other configurations' tensors left out. On CPU
there is no allocator peak to read, so it is *counted* ("cnt"): parameters + gradients + AdamW
state + the tensors autograd saved for backward (distinct storages, parameters excluded).
"""
import argparse
import copy
import json
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; unused here
import torch  # noqa: E402
import torch.nn as nn
import torch.nn.functional as F

import teamlora
from common import check_device, cli
from model import ModelArgs, Transformer

DEFAULTS = {  # (mode, on a GPU) -> defaults of the flags left unset
    ("layer", False): dict(dim=1024, hidden=2752, batch=16, seq=128, dtype="float32", experts="4", repeats=9),
    ("layer", True): dict(dim=4096, hidden=11008, batch=8, seq=1024, dtype="bfloat16", experts="4", repeats=20),
    ("model", False): dict(dim=256, hidden=688, layers=4, heads=4, vocab=4096, batch=16, seq=128,
                           dtype="float32", experts="2,4,8", repeats=5),
    ("model", True): dict(dim=4096, hidden=11008, layers=4, heads=32, vocab=32000, batch=4, seq=1024,
                          dtype="bfloat16", experts="2,4,8", repeats=10),
}
PAPER_TRAIN = {2: 0.87, 4: 0.70, 8: 0.63}  # TeamLoRA's training time / MoELoRA's, the paper's 7B runs
TARGETS = {"xLoRA": 1.10, "xMoE": 0.60}  # the layer mode's goals for TeamLoRA's forward + backward
SHAPES = {"smollm2": dict(dim=576, hidden=1536, layers=30, heads=9, kv_heads=3, vocab=49152, tied=True)}


@dataclass(frozen=True)
class Spec:
    """One benchmarked configuration; method None is the frozen base alone (the floor)."""
    label: str
    method: Optional[str]
    rank: int = 0
    experts: int = 1
    router: Optional[str] = None


def group(k, r, floor=False):
    """The rows compared at k experts of rank r; the first two are the references (xMoE, xLoRA)."""
    rows = [Spec(f"MoELoRA k{k} r{r}", "moelora", r, k), Spec(f"LoRA r{k * r}", "lora", k * r),
            Spec(f"LoRA r{r}", "lora", r), Spec(f"MoELoRA k{k} r{r} (published)", "moelora-published", r, k),
            Spec(f"MoELoRA k{k} r{r} fused*", "teamlora", r, k, "softmax"),
            Spec(f"HydraLoRA k{k} r{r}", "hydralora", r, k),
            Spec(f"HydraLoRA k{k} r{r} (published)", "hydralora-published", r, k),
            Spec(f"TeamLoRA k{k} r{r}", "teamlora", r, k)]
    return rows + [Spec("frozen base", None)] * floor


class PublishedMoELoRA(teamlora.MoELoRALinear):
    """MoELoRA as its published code computes it: every expert draws its own dropout mask."""

    def delta(self, x):
        g = (self.route(x) * self.scale).to(x.dtype)  # (..., k)
        return sum(g[..., i : i + 1] * F.linear(F.linear(self.dropout(x), self.lora_A[i]), self.lora_B[i])
                   for i in range(self.k))


class PublishedHydraLoRA(teamlora.HydraLoRALinear):
    """HydraLoRA as its published code computes it: A drop(x) again for every head, a mask each."""

    def delta(self, x):
        g = (self.route(x) * self.scale).to(x.dtype)  # (..., k)
        return sum(g[..., i : i + 1] * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B[i])
                   for i in range(self.k))


PUBLISHED = {"moelora-published": ("moelora", PublishedMoELoRA), "hydralora-published": ("hydralora", PublishedHydraLoRA)}


def adapt(module, spec, dropout):
    if spec.method is None:
        return module.requires_grad_(False)
    method, published = PUBLISHED.get(spec.method, (spec.method, None))
    teamlora.add_adapters(module, method, spec.rank, spec.experts, dropout=dropout, router=spec.router)
    if published:  # same parameters, the published computation
        for _, layer in teamlora.adapter_layers(module):
            layer.__class__ = published
    return module


def autocast(device, dtype):
    # bf16/fp16 runs keep base weights in that dtype and adapters in float32, as a real run would
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def elapsed_ms(fn, device):
    """Wall time of fn() in ms; on CUDA between two events once the queue has drained."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def interleave(jobs, repeats, warmup):
    """jobs: label -> callable returning ms. Round-robin, each round starting one job later, so a
    slow spell of a shared machine lands on every job alike. Returns label -> the timed samples."""
    labels, samples = list(jobs), {label: [] for label in jobs}
    for round_ in range(warmup + repeats):
        for i in range(len(labels)):
            label = labels[(round_ + i) % len(labels)]
            ms = jobs[label]()
            if round_ >= warmup:
                samples[label].append(ms)
    return samples


def bench_layer(args, device, dtype, specs):
    """One adapted nn.Linear (d_in = --dim, d_out = --hidden), forward + backward over batch x seq tokens."""
    tokens, jobs = args.batch * args.seq, {}
    for spec in specs:
        torch.manual_seed(0)
        holder = nn.Module()
        holder.w1 = nn.Linear(args.dim, args.hidden, bias=False, device=device, dtype=dtype)  # a default target name
        layer = adapt(holder, spec, args.dropout).w1
        # the input needs grad, as every hidden state past the first adapter does: backward computes dX too
        x = torch.randn(tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
        dy = torch.randn(tokens, args.hidden, device=device, dtype=dtype)

        def step(layer=layer, x=x, dy=dy):
            with autocast(device, dtype):
                y = layer(x)
            y.backward(dy)
            for t in (x, *layer.parameters()):
                t.grad = None

        jobs[spec.label] = lambda step=step: elapsed_ms(step, device)
    samples = interleave(jobs, args.repeats, args.warmup)
    return {label: {"fwd_bwd_ms": statistics.median(s), "samples": {"fwd_bwd_ms": s}} for label, s in samples.items()}


def decode_ms(model, prompt, new_tokens, device, dtype):
    """ms per new token of greedy decoding with the KV cache: a fixed count, the prompt's prefill untimed."""
    B, P = prompt.shape
    model.eval()  # no dropout
    with torch.inference_mode(), autocast(device, dtype):
        model.setup_cache(B, P + new_tokens)
        first = model(prompt)[:, -1:].argmax(-1)  # (B, 1)

        def steps(tok=first):
            for pos in range(P, P + new_tokens):
                tok = model(tok, start_pos=pos)[:, -1:].argmax(-1)

        ms = elapsed_ms(steps, device)
    model.clear_cache()
    return ms / new_tokens


def train_memory_mib(model, step, device):
    """Peak memory of one training step of this model alone (see the module docstring)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # frozen base + adapters
    adapter = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)  # everything resident, every configuration's
        step()
        torch.cuda.synchronize()
        # above `before`: activations, gradients, temporaries; AdamW's moments exist since the warm-up
        return (params + 2 * adapter + torch.cuda.max_memory_allocated(device) - before) / 2**20
    own = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}  # storage address -> bytes: views of one tensor count once

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in own:  # F.linear saves the frozen weight itself: counted as a parameter
            saved[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return (params + 3 * adapter + sum(saved.values())) / 2**20  # + gradients + AdamW's two moments


def bench_model(args, device, dtype, specs):
    """A LLaMA with adapters on its FFN: train step, prefill, per-token decode, training memory."""
    margs = ModelArgs(dim=args.dim, n_layers=args.layers, n_heads=args.heads, n_kv_heads=args.kv_heads,
                      vocab_size=args.vocab, hidden_dim=args.hidden, max_seq_len=args.seq + args.new_tokens,
                      tie_embeddings=args.tied)
    torch.manual_seed(0)
    with torch.device(device):
        base = Transformer(margs).to(dtype).requires_grad_(False)
    tokens = torch.randint(args.vocab, (args.batch, args.seq + 1), device=device)
    models, train, prefill, decode = {}, {}, {}, {}
    for spec in specs:
        # a fresh module tree holding the same frozen tensors (the memo maps each to itself)
        model = adapt(copy.deepcopy(base, memo={id(p): p for p in base.parameters()}), spec, args.dropout)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_step(model=model, opt=opt):
            model.train()
            with autocast(device, dtype):
                loss = model(tokens[:, :-1], tokens[:, 1:])  # the loss at every position
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for _, layer in teamlora.adapter_layers(model):  # the routers' last weights hold the step's
                if layer.routed:  # graph and with it its activations (GBs at SmolLM2's shape, per model)
                    layer.last_weights = None

        @torch.inference_mode()
        def prefill_step(model=model):
            model.eval()
            with autocast(device, dtype):
                model(tokens[:, :-1])

        models[spec.label] = (model, train_step)
        train[spec.label] = lambda f=train_step: elapsed_ms(f, device)
        prefill[spec.label] = lambda f=prefill_step: elapsed_ms(f, device)
        decode[spec.label] = lambda m=model: decode_ms(m, tokens[:, :-1], args.new_tokens, device, dtype)
    rows = {label: {"samples": {}} for label in models}
    for metric, jobs in (("train_ms", train), ("prefill_ms", prefill), ("decode_ms_per_token", decode)):
        for label, s in interleave(jobs, args.repeats, args.warmup).items():
            rows[label][metric] = statistics.median(s)
            rows[label]["samples"][metric] = s
    for label, (model, train_step) in models.items():  # memory does not drift: one pass, after the warm-up
        rows[label]["train_memory_mib"] = train_memory_mib(model, train_step, device)
        rows[label]["trainable_pct"] = teamlora.parameter_report(model)["trainable_pct"]
    return rows


def compare(rows, groups, metrics):
    """Per group k: every row's metrics with their ratios to MoELoRA k r (xMoE) and LoRA r=k r (xLoRA)."""
    out = {}
    for k, specs in groups.items():
        moe, lora = rows[specs[0].label], rows[specs[1].label]
        out[k] = {s.label: {m: {"value": rows[s.label][m], "xMoE": rows[s.label][m] / moe[m],
                                "xLoRA": rows[s.label][m] / lora[m]} for m in metrics} for s in specs}
    return out


def print_group(k, r, table, metrics, names):
    print(f"\nk={k} experts, r={r}: xMoE = / MoELoRA k{k} r{r} (loop), xLoRA = / LoRA r{k * r} (equal total rank)")
    head = f"{'method':<31}" + "".join(f" | {names[m]:>14} {'xMoE':>5} {'xLoRA':>5}" for m in metrics)
    print(head + "\n" + "-" * len(head))
    for label, cells in table.items():
        print(f"{label:<31}" + "".join(f" | {c['value']:14.3f} {c['xMoE']:5.2f} {c['xLoRA']:5.2f}"
                                        for c in cells.values()))


def summarize(args, rows, groups, metrics, names):
    """Print one table per k, then TeamLoRA against the layer mode's targets or the paper's training ratio."""
    r, table, targets = args.rank, compare(rows, groups, metrics), {}
    for k, cells in table.items():
        print_group(k, r, cells, metrics, names)
        team = cells[f"TeamLoRA k{k} r{r}"][metrics[0]]
        if args.layer:
            met = {m: team[m] <= goal for m, goal in TARGETS.items()}
            targets[str(k)] = {m: {"value": team[m], "goal": TARGETS[m], "met": met[m]} for m in TARGETS}
            floor = rows["frozen base"]["fwd_bwd_ms"]
            added = ", ".join(f"{label} {rows[label]['fwd_bwd_ms'] - floor:.3g}"
                              for label in (f"TeamLoRA k{k} r{r}", f"LoRA r{k * r}", f"MoELoRA k{k} r{r}"))
            print(f"TeamLoRA: {team['xLoRA']:.3f}x LoRA r{k * r} (target <= {TARGETS['xLoRA']}: "
                  f"{'met' if met['xLoRA'] else 'NOT met'}), {team['xMoE']:.3f}x MoELoRA (target <= "
                  f"{TARGETS['xMoE']}: {'met' if met['xMoE'] else 'NOT met'})\nms added to the frozen layer's "
                  f"{floor:.3g} (its forward and dX): {added}")
        elif k in PAPER_TRAIN:
            print(f"TeamLoRA train step: {team['xMoE']:.2f}x MoELoRA (paper, whole 7B training: {PAPER_TRAIN[k]})")
    return table, targets


def check_args(p, args):
    """Each flag's rule (defaults resolved), before anything is built: one line naming the flag."""
    for flag in ("dim", "hidden", "layers", "heads", "kv_heads", "vocab", "batch", "seq", "new_tokens", "rank",
                 "repeats"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:  # None: unused in --layer mode
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if not all(k.strip().isdigit() and int(k) >= 1 for k in args.experts.split(",")):
        p.error(f"--experts {args.experts}: must be comma-separated whole numbers, each at least 1")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout {args.dropout}: must be a probability in [0, 1)")
    if not args.layer and (args.dim % args.heads or (args.dim // args.heads) % 2 or args.heads % args.kv_heads):
        p.error(f"--dim {args.dim}, --heads {args.heads}, --kv-heads {args.kv_heads}: the heads must split dim "
                "into even head sizes (RoPE pairs), and --kv-heads must divide --heads")
    if args.json and Path(args.json).is_dir():
        p.error(f"--json {args.json}: a directory, not a file")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", action="store_true", help="benchmark one adapted linear layer, not a model")
    p.add_argument("--shape", choices=["default", *SHAPES], default="default",
                   help="smollm2: SmolLM2-135M's dimensions (random weights) instead of the defaults below")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--dim", type=int, help="model dim; the layer's d_in in --layer mode")
    p.add_argument("--hidden", type=int, help="FFN hidden size; the layer's d_out in --layer mode")
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention; default: --heads)")
    p.add_argument("--vocab", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int, help="tokens per sequence (the prompt length when decoding)")
    p.add_argument("--new-tokens", type=int, default=32, help="decoded tokens per timing")
    p.add_argument("--rank", type=int, default=8, help="rank per expert r")
    p.add_argument("--dropout", type=float, default=0.05, help="adapter dropout while training (train.py's default)")
    p.add_argument("--experts", help="comma-separated k values (default: 4 for --layer, 2,4,8 otherwise)")
    p.add_argument("--repeats", type=int, help="timed rounds; the tables show medians")
    p.add_argument("--json", help="write every number (samples included) to this path")
    args = p.parse_args(argv)
    if (why := check_device(args.device)) is not None:
        p.error(f"--device {why}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mode = "layer" if args.layer else "model"
    for key, value in {**DEFAULTS[mode, device.type == "cuda"], **SHAPES.get(args.shape, {})}.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    args.tied = getattr(args, "tied", False)  # set by a shape only
    args.warmup = 2 if device.type == "cuda" else 1
    check_args(p, args)
    dtype = getattr(torch, args.dtype)
    groups = {int(k): group(int(k), args.rank, floor=args.layer) for k in args.experts.split(",")}
    specs = list({s.label: s for g in groups.values() for s in g}.values())  # LoRA r is shared by every k

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    shape = (f"layer {args.dim} -> {args.hidden}, {args.batch * args.seq} tokens" if args.layer else
             f"LLaMA dim {args.dim}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), FFN "
             f"{args.hidden}, vocab {args.vocab}{' tied' * args.tied}; batch {args.batch} x {args.seq}, decode "
             f"{args.new_tokens} tokens")
    print(f"{mode} mode on {where}, {args.dtype}; {shape}; median of {args.repeats} interleaved rounds")
    if args.layer:
        metrics, names = ["fwd_bwd_ms"], {"fwd_bwd_ms": "fwd+bwd ms"}
        rows = bench_layer(args, device, dtype, specs)
    else:
        metrics = ["train_ms", "prefill_ms", "decode_ms_per_token", "train_memory_mib"]
        names = {"train_ms": "train step ms", "prefill_ms": "prefill ms", "decode_ms_per_token": "decode ms/tok",
                 "train_memory_mib": "train MiB" + ("" if device.type == "cuda" else " (cnt)")}
        rows = bench_model(args, device, dtype, specs)
    table, targets = summarize(args, rows, groups, metrics, names)
    print("\n* MoELoRA fused: the same dense MoELoRA computed in TeamLoRA's fused form (teamlora + softmax router)."
          "\n(published): as the published code computes it: a dropout mask per expert (MoELoRA); A drop(x) with its "
          "own mask for every head (HydraLoRA).")
    if not args.layer and device.type != "cuda":
        print("(cnt) CPU memory is counted, not measured: parameters, gradients, AdamW state, tensors saved for backward.")
    result = {"mode": mode, "device": where, "torch": torch.__version__,
              "args": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows,
              "groups": {str(k): v for k, v in table.items()}, "targets": targets}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    cli(main)
