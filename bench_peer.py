"""The project's training step against Hugging Face transformers + PEFT, same weights, same batch.

transformers and peft are NOT project dependencies: run this in a throwaway environment,

    python -m venv /tmp/peer && /tmp/peer/bin/pip install torch transformers peft
    /tmp/peer/bin/python bench_peer.py --base DIR      # DIR: a Hugging Face Llama checkpoint directory

Each step is forward, cross-entropy, backward and AdamW on the adapters only, LoRA on the FFN
(gate/up/down = w1/w3/w2) in both. "lm": the loss at every position (full vocabulary); "ft": the
loss on the last --answer tokens of each row only, -100 elsewhere (the project: forward(tokens,
targets); the peer: the same labels). Rounds are interleaved (each starts one configuration
later) after a warm-up; the table shows medians and ratios within the run.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

import teamlora
from common import UserError, cli
from model import IGNORE, Transformer


def project(base, method, rank, experts, dropout):
    model = Transformer.from_pretrained(base)
    teamlora.add_adapters(model, method, rank, experts, alpha=32.0, dropout=dropout, targets=("w1", "w2", "w3"))
    return model.train()


def peer_modules():
    """peft's LoraConfig and get_peft_model, transformers' AutoModelForCausalLM: not project
    dependencies, so imported only when the benchmark runs (--help and the checks work without)."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise UserError(f"bench_peer.py needs transformers and peft ({e}); they are not project dependencies: "
                        "pip install transformers peft in a throwaway environment") from None
    return LoraConfig, get_peft_model, AutoModelForCausalLM


def peer(base, rank, dropout):
    LoraConfig, get_peft_model, AutoModelForCausalLM = peer_modules()
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=32, lora_dropout=dropout, target_modules=["gate_proj", "up_proj", "down_proj"])
    return get_peft_model(model, config).train()


def loss_fn(model, is_peer, x, y):
    if is_peer:  # shift_labels: the peer's loss on exactly these targets, no shift of its own
        return model(input_ids=x, labels=y, shift_labels=y).loss
    return model(x, y)


def check_args(p, args):
    """Each flag's rule, before a model is built: one line naming the flag (exit status 2)."""
    for flag in ("batch", "seq", "answer", "rounds"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.answer > args.seq:
        p.error(f"--answer {args.answer}: at most --seq ({args.seq}) loss positions per row")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout {args.dropout}: must be a probability in [0, 1)")
    if not args.steps or not set(args.steps.split(",")) <= {"lm", "ft"}:
        p.error(f"--steps {args.steps}: comma-separated lm and/or ft")
    if not (Path(args.base) / "config.json").is_file():
        p.error(f"--base {args.base}: not a Hugging Face checkpoint directory (no config.json)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="Hugging Face Llama checkpoint directory")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--answer", type=int, default=2, help="loss positions per row in the 'ft' step")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", default="lm,ft", help="comma-separated: lm, ft")
    args = p.parse_args(argv)
    check_args(p, args)
    peer_modules()  # a missing peft is said before any model loads
    torch.manual_seed(0)
    models = {"project LoRA r32": (project(args.base, "lora", 32, 1, args.dropout), False),
              "project TeamLoRA k4 r8": (project(args.base, "teamlora", 8, 4, args.dropout), False),
              "peer LoRA r32": (peer(args.base, 32, args.dropout), True)}
    vocab = models["project LoRA r32"][0].args.vocab_size
    ids = torch.randint(vocab, (args.batch, args.seq + 1), generator=torch.Generator().manual_seed(1))
    x, y_lm = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    y_ft = torch.full_like(y_lm, IGNORE)
    y_ft[:, -args.answer:] = y_lm[:, -args.answer:]
    targets = {"lm": y_lm, "ft": y_ft}
    with torch.no_grad():  # same weights, same loss: the comparison is of one computation
        for step, y in targets.items():
            losses = {}
            for label, (m, is_peer) in models.items():
                m.eval()
                losses[label] = loss_fn(m, is_peer, x, y).item()
                m.train()
            print(f"{step}: loss in eval mode " + ", ".join(f"{k} {v:.5f}" for k, v in losses.items()))
    jobs = {}
    for step in args.steps.split(","):
        for label, (m, is_peer) in models.items():
            opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-5)

            def run(m=m, is_peer=is_peer, y=targets[step], opt=opt):
                t = time.perf_counter()
                loss_fn(m, is_peer, x, y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return time.perf_counter() - t

            jobs[step, label] = run
    samples = {key: [] for key in jobs}
    keys = list(jobs)
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for i in range(len(keys)):
            key = keys[(round_ + i) % len(keys)]
            s = jobs[key]()
            if round_:
                samples[key].append(s)
            print(f"round {round_}{' (warm-up)' * (round_ == 0)} {key[0]} {key[1]}: {s * 1e3:.0f} ms", flush=True)
    print(f"\n{torch.get_num_threads()} threads, batch {args.batch} x {args.seq}, dropout {args.dropout}; "
          f"median of {args.rounds} interleaved rounds (min-max); ratios: the median of each round's ratio "
          f"(the same round's steps, a few seconds apart: a shared machine's drift cancels)")
    for step in args.steps.split(","):
        for label in models:
            s = samples[step, label]
            ratio = {ref: statistics.median(a / b for a, b in zip(s, samples[step, ref]))
                     for ref in ("peer LoRA r32", "project LoRA r32")}
            print(f"{step:>3} {label:<24} {statistics.median(s) * 1e3:8.0f} ms ({min(s) * 1e3:.0f}-{max(s) * 1e3:.0f})"
                  f"  x peer {ratio['peer LoRA r32']:.3f}  x project LoRA {ratio['project LoRA r32']:.3f}")
    return samples


if __name__ == "__main__":
    cli(main)
