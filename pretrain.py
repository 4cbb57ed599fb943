"""The built-in tiny base (`--base tiny`): its corpus, its tokenizer and its pretraining loop.

    python pretrain.py                  # builds the tiny base of 700 steps (train.py --base tiny does on first use)
    python pretrain.py --steps 2000     # another length: train.py --base tiny --pretrain-steps 2000 uses it

A SentencePiece tokenizer (data.train_tokenizer) and a 4-layer LLaMA (model.py), every weight
trained by next-token loss on pretraining_texts() of the built-in mixture. Each length has its own
directory in the cache, TEAMLORA_CACHE/tiny-base/STEPS-steps (default: cache/ in this checkout),
with built_from.json: the steps, the model's shape and a hash of the text it was pretrained on. A
base is reused only when all three match, so it never serves a run that asked for another one.
"""
import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator

import torch
from tqdm import tqdm

from common import check_device, cli, default_device
from data import Example, load_mixture, train_tokenizer
from model import ModelArgs, Transformer, load_tokenizer, tiny_dir

CORPUS = Path(__file__).parent / "data" / "austen.txt.gz"
# ~4.5M parameters; README says how it was chosen
TINY = dict(dim=256, n_layers=4, n_heads=4, n_kv_heads=4, vocab_size=4096, hidden_dim=688, max_seq_len=512,
            tie_embeddings=True)


def pretraining_texts(train: list[Example]) -> Iterator[str]:
    """The built-in corpus, then the mixture's unlabelled text, then each task's answer words.

    Without the mixture's text the answer words never occur in pretraining and their (frozen,
    tied) embeddings stay untrained. Outputs are left out: the base sees the answer words, but
    never which input they answer.
    """
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for para in re.split(r"\n\s*\n", f.read()):
            if para.strip():
                yield " ".join(para.split())  # undo the plain-text edition's hard line wraps
    for ex in train:
        yield f"{ex.instruction}\n{ex.input}" if ex.input else ex.instruction
    for _, choices in dict.fromkeys((ex.task, tuple(ex.choices)) for ex in train if ex.choices):
        yield "Answers: " + ", ".join(choices)


def lm_stream(tok, texts: Iterable[str]) -> torch.Tensor:
    """All texts as one (N,) token stream, each wrapped in bos ... eos."""
    ids = []
    for text in texts:
        ids += tok.encode(text, bos=True, eos=True)
    return torch.tensor(ids, dtype=torch.long)


def lm_batch(stream: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator):
    """Random windows of the stream: tokens (B, T) and targets (B, T), the next tokens."""
    if len(stream) <= seq_len:
        raise ValueError(f"the token stream has {len(stream)} tokens, need more than seq_len {seq_len}")
    start = torch.randint(len(stream) - seq_len, (batch_size, 1), generator=generator)  # (B, 1)
    idx = start + torch.arange(seq_len)  # (B, T)
    return stream[idx], stream[idx + 1]


def built_from(steps: int, texts: list[str]) -> dict:
    """What a tiny base is built from, as built_from.json records it: a cached base whose record
    differs (other steps, another shape, a changed corpus or built-in mixture) is built again."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode() + b"\0")
    return {"steps": steps, "model": TINY, "texts": digest.hexdigest()}


def tiny_base(steps: int = 700, device="cpu") -> Path:
    """`--base tiny`: the tiny base of `steps` pretraining steps, built on first use (or when what
    it is built from changed) and cached in model.tiny_dir(steps). Returns that directory."""
    out = tiny_dir(steps)
    t0 = time.time()
    texts = list(pretraining_texts(load_mixture(None)[0]))
    stamp = built_from(steps, texts)
    if (out / "built_from.json").exists() and json.loads((out / "built_from.json").read_text()) == stamp:
        return out
    # Built under a temporary name, then renamed: a crash never leaves a half-built base behind.
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train_tokenizer(texts, tmp / "tokenizer", vocab_size=TINY["vocab_size"])
    stream = lm_stream(load_tokenizer(tmp), texts)
    torch.manual_seed(0)
    model = Transformer(ModelArgs(**TINY)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(0)
    for step in (bar := tqdm(range(steps), desc="pretraining tiny base", dynamic_ncols=True)):
        # peak 3e-3, linear warm-up over 50 steps, then cosine decay to 0
        warm, cos = (step + 1) / 50, 0.5 * (1 + math.cos(math.pi * (max(0, step - 50) / max(1, steps - 50))))
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(warm, cos)
        x, y = lm_batch(stream, 16, 128, gen)
        loss = torch.nn.functional.cross_entropy(model(x.to(device)).flatten(0, 1), y.to(device).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(tmp)
    (tmp / "built_from.json").write_text(json.dumps(stamp, indent=1))
    if out.exists():  # built from something else: its record says what
        shutil.rmtree(out)
    os.replace(tmp, out)
    print(f"tiny base: {stream.numel():,} tokens, final loss {loss.item():.3f}, {time.time() - t0:.0f} s -> {out}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=700, help="pretraining steps, as train.py's --pretrain-steps "
                   "(default: 700)")
    p.add_argument("--device", help="default: cuda if there is a GPU, else cpu")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps {args.steps}: must be at least 1")
    if (why := check_device(args.device)) is not None:
        p.error(f"--device {why}")
    print(f"tiny base of {args.steps} steps: {tiny_base(args.steps, default_device(args.device))}")


if __name__ == "__main__":
    cli(main)
