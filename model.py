"""LLaMA in Meta's naming: loads LLaMA-2, Llama-3/3.1, TinyLlama and Mistral-style checkpoints
(Meta params.json + consolidated.*.pth, or Hugging Face config.json + safetensors/bin) and generates.
The checkpoint readers, the tokenizer and Hub ids live here beside the model, so that this one file
loads and runs any base it supports; it imports nothing else of the project.

    python model.py CHECKPOINT_DIR --prompt "The capital of France is" --max-new-tokens 32
    python eval.py --ckpt runs/teamlora --prompt "..."    # with a run's adapters (eval.py reads runs)
    python -m pytest -q tests/test_model.py
"""
import argparse
import functools
import json
import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns without numpy; unused here
import torch  # noqa: E402
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


IGNORE = -100  # a target without loss (F.cross_entropy's ignore_index; data.IGNORE is the same)


class CheckpointError(ValueError):
    """A checkpoint, tokenizer or base name that cannot be used (a user's mistake, not a bug)."""


class CheckpointNotFound(CheckpointError, FileNotFoundError):
    """A checkpoint directory, file or Hub id that is not there."""


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None
    vocab_size: int = 32000
    hidden_dim: Optional[int] = None  # explicit FFN size (HF intermediate_size); else Meta's rule below
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 RoPE: {factor, low_freq_factor, high_freq_factor, original_max_position_embeddings}
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False


def ffn_hidden_dim(args: ModelArgs) -> int:
    if args.hidden_dim is not None:
        return args.hidden_dim
    # Meta: 2/3 of 4*dim keeps SwiGLU's three matrices at the cost of a 4*dim two-matrix MLP
    hidden = int(2 * 4 * args.dim / 3)
    if args.ffn_dim_multiplier is not None:
        hidden = int(args.ffn_dim_multiplier * hidden)
    return args.multiple_of * ((hidden + args.multiple_of - 1) // args.multiple_of)


def rope_frequencies(args: ModelArgs, device=None) -> torch.Tensor:
    """theta^(-2i/head_dim) for i < head_dim/2, with Llama-3.1 scaling when args.rope_scaling is set."""
    head_dim = args.dim // args.n_heads
    freqs = 1.0 / args.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    s = args.rope_scaling
    if s:
        # wavelengths much shorter than the original context are kept, much longer ones are
        # divided by factor, and in between the two are blended linearly in context/wavelength
        ratio = s["original_max_position_embeddings"] / (2 * math.pi / freqs)
        smooth = ((ratio - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])).clamp(0, 1)
        freqs = (1 - smooth) * freqs / s["factor"] + smooth * freqs
    return freqs


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by position * freq_i, in float32: Meta's complex form."""
    # x: (B, T, H, head_dim); cos, sin: (T, head_dim/2), float32. One complex product: on a CPU its
    # forward + backward take a fifth of the time of real halves that are stacked and flattened again.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, T, H, head_dim/2)
    return torch.view_as_real(pairs * torch.complex(cos, sin)[:, None, :]).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / sqrt(mean(x^2) + eps) in float32 (bf16 squares of large activations lose the mean's
        # precision), then scaled in x's dtype as Meta does; F.rms_norm is one kernel for the first part
        return F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads = args.n_heads
        self.n_kv_heads = args.n_kv_heads or args.n_heads
        self.head_dim = args.dim // args.n_heads
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)
        self.cache_k = self.cache_v = None  # (max_B, max_S, n_kv_heads, head_dim) while decoding

    def forward(self, x, start_pos, cos, sin):
        B, T, _ = x.shape
        q = apply_rotary_emb(self.wq(x).view(B, T, self.n_heads, self.head_dim), cos, sin)
        k = apply_rotary_emb(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), cos, sin)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.cache_k is not None:
            self.cache_k[:B, start_pos:start_pos + T] = k
            self.cache_v[:B, start_pos:start_pos + T] = v
            k, v = self.cache_k[:B, :start_pos + T], self.cache_v[:B, :start_pos + T]
        # heads first for SDPA: q (B, n_heads, T, head_dim), k and v (B, n_kv_heads, S, head_dim), S = start_pos + T
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        mask = None
        if start_pos > 0 and T > 1:
            # query t sits at position start_pos + t and sees keys 0 .. start_pos + t
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=x.device).tril(diagonal=start_pos)
        # is_causal aligns the triangle top-left, right only when queries start at position 0;
        # a single query (T == 1) sees every cached key and needs no mask
        # enable_gqa: each kv head serves n_heads / n_kv_heads query heads, without copying k and v per query head
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=start_pos == 0 and T > 1,
                                             enable_gqa=self.n_kv_heads < self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, ffn_hidden_dim(args))
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, start_pos, cos, sin):
        h = x + self.attention(self.attention_norm(x), start_pos, cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.gradient_checkpointing = False
        self._init_rope(args.max_seq_len)
        for name, p in self.named_parameters():  # for training from scratch (the tiny base): N(0, 0.02),
            if p.dim() == 2:  # residual-branch outputs shrunk with depth, so initial logits stay small
                deep = name.endswith(("wo.weight", "w2.weight"))
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * args.n_layers) if deep else 0.02)

    def _init_rope(self, seq_len: int, device=None):
        # not in the state dict: recomputed from args, always float32
        positions = torch.arange(seq_len, device=device, dtype=torch.float32)
        angles = torch.outer(positions, rope_frequencies(self.args, device))
        self.register_buffer("cos", angles.cos(), persistent=False)  # (seq_len, head_dim/2)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, tokens: torch.Tensor, targets: Optional[torch.Tensor] = None, reduction: str = "mean",
                start_pos: int = 0, last_only: bool = False) -> torch.Tensor:
        """tokens (B, T) at positions start_pos .. start_pos+T-1.

        Without targets: float logits (B, T, vocab_size), or (B, 1, vocab_size) of the last position
        with last_only (generation's prefill needs no others). With targets (B, T), IGNORE where there is
        no loss: their cross-entropy, "mean" over the target positions or "none" (B, T) with 0 where
        ignored. The output layer and its float32 log-softmax then run only at the target positions:
        fine-tuning scores a few answer tokens, and a large vocabulary at every position would cost a
        large share of a small model's step.
        """
        T = tokens.shape[1]
        if start_pos + T > self.cos.shape[0] or self.cos.dtype != torch.float32:
            # longer than max_seq_len, or model.to(bf16) rounded the buffers: recompute
            self._init_rope(max(start_pos + T, self.cos.shape[0]), self.cos.device)
        cos, sin = self.cos[start_pos:start_pos + T], self.sin[start_pos:start_pos + T]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, start_pos, cos, sin, use_reentrant=False)
            else:
                h = layer(h, start_pos, cos, sin)
        if targets is None:
            return self.output(self.norm(h[:, -1:] if last_only else h)).float()
        keep = targets != IGNORE  # (B, T)
        # (N, vocab) logits at the N target positions only; float32 for the log-softmax under autocast
        logits = self.output(self.norm(h[keep])).float()
        loss = F.cross_entropy(logits, targets[keep], reduction=reduction)
        if reduction == "none":
            return torch.zeros(targets.shape, dtype=loss.dtype, device=loss.device).index_put((keep,), loss)
        return loss

    def setup_cache(self, max_batch_size: int, max_seq_len: int):
        """KV caches of at least (max_batch_size, max_seq_len) positions per layer. Left uninitialised:
        attention writes every position before it reads it. A cache that is large enough already is
        reused (choice scoring asks for one per group), else it grows to cover both this request and
        the last: bounded by the largest batch and the longest sequence asked for."""
        w = self.tok_embeddings.weight
        for layer in self.layers:
            a = layer.attention
            old = a.cache_k
            if old is not None and (old.dtype, old.device) == (w.dtype, w.device):
                if old.shape[0] >= max_batch_size and old.shape[1] >= max_seq_len:
                    continue
                max_batch_size, max_seq_len = max(old.shape[0], max_batch_size), max(old.shape[1], max_seq_len)
            shape = (max_batch_size, max_seq_len, a.n_kv_heads, a.head_dim)
            a.cache_k = a.cache_v = None  # the old pair is freed before the new one is allocated
            a.cache_k = torch.empty(shape, dtype=w.dtype, device=w.device)
            a.cache_v = torch.empty(shape, dtype=w.dtype, device=w.device)

    def select_cache(self, rows: torch.Tensor, length: Optional[int] = None):
        """Cache row i becomes what row rows[i] holds at positions 0 .. length - 1 (default: all):
        several continuations of one prefilled prompt copy the prompt's positions only."""
        for layer in self.layers:
            a = layer.attention
            a.cache_k[:len(rows), :length], a.cache_v[:len(rows), :length] = a.cache_k[rows, :length], a.cache_v[rows, :length]

    def clear_cache(self):
        for layer in self.layers:
            layer.attention.cache_k = layer.attention.cache_v = None

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 eos_id: Optional[int] = None, generator: Optional[torch.Generator] = None) -> list[list[int]]:
        """New tokens for each prompt (eos excluded): greedy at temperature 0, else nucleus sampling."""
        if max_new_tokens <= 0:
            return [[] for _ in prompts]
        device = self.tok_embeddings.weight.device
        lens = [len(p) for p in prompts]
        if min(lens) == 0:
            raise ValueError("every prompt needs at least one token (e.g. bos)")
        total = max(lens) + max_new_tokens
        # Rows share positions: decoding starts after the shortest prompt, and a row still inside
        # its prompt takes its next prompt token instead of the sample, so no row ever sees padding.
        tokens = torch.zeros(len(prompts), total, dtype=torch.long, device=device)
        in_prompt = torch.zeros(len(prompts), total, dtype=torch.bool, device=device)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)] = torch.tensor(p, dtype=torch.long)
            in_prompt[i, :len(p)] = True
        ends = torch.tensor(lens, device=device) + max_new_tokens  # one past each row's last new token
        done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
        self.setup_cache(len(prompts), total)
        try:
            prev = 0
            for cur in range(min(lens), total):
                logits = self(tokens[:, prev:cur], start_pos=prev, last_only=True)[:, -1]  # (B, vocab)
                nxt = torch.where(in_prompt[:, cur], tokens[:, cur], sample(logits, temperature, top_p, generator))
                tokens[:, cur] = nxt
                if eos_id is not None:
                    done |= ~in_prompt[:, cur] & (nxt == eos_id)
                done |= cur + 1 >= ends
                prev = cur
                if done.all():
                    break
        finally:
            self.clear_cache()
        out = []
        for i, n in enumerate(lens):
            new = tokens[i, n:min(n + max_new_tokens, cur + 1)].tolist()
            out.append(new[:new.index(eos_id)] if eos_id in new else new)
        return out

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu") -> "Transformer":
        """Load a Hugging Face (config.json) or Meta (params.json) checkpoint directory, or a Hub id.
        Each tensor is cast from the checkpoint's own dtype to `dtype` (float32 master weights are
        exact from an fp16 or fp32 checkpoint)."""
        path = resolve_base(path)
        with torch.device("meta"):  # shapes only; the checkpoint's tensors become the parameters
            model = cls(checkpoint_args(path))
        # copy=True: never keep a view of an mmapped file that a later save could overwrite
        state = {name: t.to(device=device, dtype=dtype, copy=True) for name, t in checkpoint_tensors(path, model)}
        model.load_state_dict(state, strict=False, assign=True)
        model._init_rope(model.args.max_seq_len, device)
        if model.args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
        return model.eval()

    def save_pretrained(self, path):
        """Meta layout: consolidated.00.pth, then params.json (with our extra keys hidden_dim,
        rope_scaling, tie_embeddings, max_seq_len), so a directory with params.json is complete."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        if self.args.tie_embeddings:
            state.pop("output.weight")
        torch.save(state, path / "consolidated.00.pth")
        (path / "params.json").write_text(json.dumps(asdict(self.args), indent=2))


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator=None) -> torch.Tensor:
    """(B, vocab) -> (B,): argmax at temperature 0, else a draw from the smallest set of tokens holding top_p."""
    if temperature == 0:
        return logits.argmax(-1)
    probs, idx = torch.softmax(logits.float() / temperature, dim=-1).sort(dim=-1, descending=True)
    probs[probs.cumsum(-1) - probs > top_p] = 0  # drop tokens once the ones before them already hold top_p
    return idx.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)


# ---- checkpoint readers: (ModelArgs, iterator of (meta_name, "file:original_name", tensor)) ----

_HF_NAMES = {  # substring replacements, Hugging Face -> Meta
    "model.embed_tokens.": "tok_embeddings.", "model.norm.": "norm.", "lm_head.": "output.",
    "model.layers.": "layers.", "self_attn.q_proj.": "attention.wq.", "self_attn.k_proj.": "attention.wk.",
    "self_attn.v_proj.": "attention.wv.", "self_attn.o_proj.": "attention.wo.",
    "mlp.gate_proj.": "feed_forward.w1.", "mlp.down_proj.": "feed_forward.w2.", "mlp.up_proj.": "feed_forward.w3.",
    "post_attention_layernorm.": "ffn_norm.", "input_layernorm.": "attention_norm.",
}


def _unpermute_hf(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF stores each head's rows as [all even dims, all odd dims] for rotate-half RoPE; restore Meta's pairs.
    n_heads is n_kv_heads for wk (GQA)."""
    return w.view(n_heads, 2, w.shape[0] // n_heads // 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def _hf_args(config: dict, file: Path) -> ModelArgs:
    def reject(key, why):
        raise CheckpointError(f"{file}: {key}={config[key]!r} is not supported ({why})")

    if config.get("model_type", "llama") not in ("llama", "mistral"):
        reject("model_type", "only llama and mistral")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            reject(key, "projections have no bias")
    if config.get("hidden_act", "silu") != "silu":
        reject("hidden_act", "the FFN is SwiGLU")
    try:
        dim, n_heads = config["hidden_size"], config["num_attention_heads"]
        max_pos = config.get("max_position_embeddings", 2048)
        if config.get("head_dim") not in (None, dim // n_heads):
            reject("head_dim", f"must be hidden_size / num_attention_heads = {dim // n_heads}")
        if config.get("sliding_window") is not None and config["sliding_window"] < max_pos:
            reject("sliding_window", "sliding-window attention")
        # transformers >= 5 writes rope_parameters; older versions rope_theta + rope_scaling
        rope_key = "rope_parameters" if config.get("rope_parameters") else "rope_scaling"
        rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta", 10000.0),
                                                 **(config.get("rope_scaling") or {})}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            reject(rope_key, "only default and llama3 RoPE")
        scaling_keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return ModelArgs(
            dim=dim, n_layers=config["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=config.get("num_key_value_heads", n_heads), vocab_size=config["vocab_size"],
            hidden_dim=config["intermediate_size"], norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=rope.get("rope_theta", 10000.0),
            rope_scaling={k: rope[k] for k in scaling_keys} if rope_type == "llama3" else None,
            max_seq_len=max_pos, tie_embeddings=config.get("tie_word_embeddings", False))
    except KeyError as e:
        raise CheckpointError(f"{file}: missing key {e}") from None


def _hf_checkpoint(path: Path):
    args = _hf_args(json.loads((path / "config.json").read_text()), path / "config.json")
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (path / single).exists():
            files = [path / single]
            break
        if (path / index).exists():
            files = [path / f for f in sorted(set(json.loads((path / index).read_text())["weight_map"].values()))]
            break
    else:
        raise CheckpointNotFound(f"{path}: config.json but no weights (looked for model.safetensors, "
                                "model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json)")
    if absent := [str(f) for f in files if not f.exists()]:
        raise CheckpointNotFound(f"{path}: shards named in the index are missing: {absent}")

    def tensors():
        for file in files:
            for k, t in _read(file):
                if not k.endswith("rotary_emb.inv_freq"):  # old transformers saved this buffer; we recompute it
                    name = k
                    for hf, meta in _HF_NAMES.items():
                        name = name.replace(hf, meta)
                    yield name, f"{file}:{k}", t
    return args, tensors()


def _meta_checkpoint(path: Path):
    params = json.loads((path / "params.json").read_text())
    files = sorted(path.glob("consolidated.*.pth"))
    if not files:
        raise CheckpointNotFound(f"{path}: params.json but no consolidated.*.pth")
    shards = [dict(_read(f)) for f in files]  # mmapped: costs address space, not memory
    args = ModelArgs(**{f.name: params[f.name] for f in fields(ModelArgs) if f.name in params})
    if params.get("use_scaled_rope") and not args.rope_scaling:  # Llama-3.1's constants
        args.rope_scaling = dict(factor=params.get("rope_scaling_factor", 8.0), low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192)
    if args.vocab_size <= 0:  # LLaMA-2 writes -1; its embedding is split along dim, so shard 0 has every row
        args.vocab_size = shards[0]["tok_embeddings.weight"].shape[0]

    def tensors():
        for name, first in shards[0].items():
            if name == "rope.freqs":  # LLaMA-1/2 store the frequencies; we recompute them
                continue
            source = f"{files[0]}:{name}"
            if len(shards) == 1 or first.ndim == 1:  # norms are replicated on every model-parallel rank
                yield name, source, first
                continue
            if absent := [str(f) for f, s in zip(files, shards) if name not in s]:
                raise CheckpointError(f"{name} is in {files[0]} but not in {absent}")
            # column-parallel layers split output rows, row-parallel ones (wo, w2) input columns; the
            # embedding is split along dim in LLaMA-2 (ParallelEmbedding), along vocab in Llama-3
            if name == "tok_embeddings.weight":
                cat_dim = 0 if first.shape[1] == args.dim else 1
            else:
                cat_dim = 1 if name.endswith(("wo.weight", "w2.weight")) else 0
            yield name, source, torch.cat([s[name] for s in shards], dim=cat_dim)
    return args, tensors()


def checkpoint_args(path) -> ModelArgs:
    """The ModelArgs of a checkpoint directory or Hub id, its config checked and its weight files
    found, without reading a weight: the cheap checks to run before a base that loads for minutes."""
    return _checkpoint(resolve_base(path))[1]  # HF tensors are read lazily, when iterated; Meta shards mmapped


def checkpoint_tensors(path, model):
    """(name, tensor) of a checkpoint directory, one tensor at a time, in `model`'s names and
    layout (Meta's q/k row order), in the checkpoint's dtype; each is checked against the shapes
    of `model` (a Transformer without adapters, on the meta device will do), and once all are read
    an error lists what was missing or unexpected. train.py --fsdp loads each rank's part of every
    tensor as it comes."""
    path = resolve_base(path)
    hf, args, tensors = _checkpoint(path)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if args.tie_embeddings:
        expected.pop("output.weight")
    seen, unexpected = set(), []
    for name, source, t in tensors:
        if args.tie_embeddings and name == "output.weight":
            continue  # some tied checkpoints still store the shared matrix
        if name not in expected:
            unexpected.append(source)
            continue
        if t.shape != expected[name]:
            raise CheckpointError(f"{source}: shape {tuple(t.shape)}, but {name} in the model "
                                  f"is {tuple(expected[name])}")
        if hf and name.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = _unpermute_hf(t, args.n_heads if name.endswith("wq.weight") else args.n_kv_heads or args.n_heads)
        seen.add(name)
        yield name, t
    missing = [k for k in expected if k not in seen]
    if missing or unexpected:
        raise CheckpointError(f"{path}: checkpoint does not match the model; missing {len(missing)}: "
                              f"{missing[:10]}; unexpected {len(unexpected)}: {unexpected[:10]}")


def _checkpoint(path: Path):
    """(is Hugging Face layout, ModelArgs, iterator of tensors) of a checkpoint directory."""
    if (path / "config.json").exists():
        return (True, *_hf_checkpoint(path))
    if (path / "params.json").exists():
        return (False, *_meta_checkpoint(path))
    raise CheckpointNotFound(f"{path}: no checkpoint here (looked for config.json and params.json)")


def _read(file: Path):
    """(name, tensor) pairs of one safetensors or pickled-torch file; a damaged file names itself."""
    try:
        if file.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(file), framework="pt") as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e


class Tokenizer:
    """SentencePiece tokenizer.model (LLaMA-2, TinyLlama, Mistral) or Hugging Face tokenizer.json (Llama-3)."""

    def __init__(self, path):
        self.path = path = Path(path)  # the file it was loaded from
        if path.suffix == ".json":
            try:
                from tokenizers import Tokenizer as HFTokenizer
            except ImportError:
                raise CheckpointError(f"{path} needs the tokenizers package: pip install tokenizers") from None
            try:
                tok = HFTokenizer.from_file(str(path))
            except Exception as e:  # tokenizers raises a bare Exception for a damaged file
                raise CheckpointError(f"{path}: not a readable tokenizer ({e})") from e
            config_file = path.parent / "tokenizer_config.json"
            config = json.loads(config_file.read_text()) if config_file.exists() else {}

            def special(key, defaults):
                token = config.get(key)
                token = token.get("content") if isinstance(token, dict) else token
                ids = [tok.token_to_id(t) for t in [token, *defaults] if t]
                return next((i for i in ids if i is not None), None)

            self.bos_id = special("bos_token", ["<|begin_of_text|>", "<s>"])
            self.eos_id = special("eos_token", ["<|end_of_text|>", "</s>"])
            pad_id = special("pad_token", [])
            self.n_words = tok.get_vocab_size(with_added_tokens=True)
            self._encode = lambda s: tok.encode(s, add_special_tokens=False).ids
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)
        else:
            import sentencepiece as spm
            try:
                sp = spm.SentencePieceProcessor(model_file=str(path))
            except Exception as e:  # Meta's Llama-3 tokenizer.model is a tiktoken file
                raise CheckpointError(f"{path} is not a SentencePiece model ({e}); for Llama-3 use the "
                                 "Hugging Face tokenizer.json") from e
            # SentencePiece says -1 for a disabled special token
            self.bos_id, self.eos_id, pad_id = (i if i >= 0 else None for i in (sp.bos_id(), sp.eos_id(), sp.pad_id()))
            self.n_words = sp.vocab_size()
            self._encode, self._decode = sp.encode, sp.decode
        if self.bos_id is None or self.eos_id is None:
            raise CheckpointError(f"{path}: no bos or eos token")
        self.pad_id = self.eos_id if pad_id is None else pad_id  # LLaMA has no pad token; eos is masked anyway

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)


def load_tokenizer(model_dir) -> Tokenizer:
    """The tokenizer of a checkpoint directory or Hub id: tokenizer.model, else tokenizer.json."""
    model_dir = resolve_base(model_dir)
    for name in ("tokenizer.model", "tokenizer.json"):
        if (model_dir / name).exists():
            return Tokenizer(model_dir / name)
    raise CheckpointNotFound(f"{model_dir}: no tokenizer (looked for tokenizer.model and tokenizer.json)")


# ---- Hugging Face Hub ids ----------------------------------------------------------------------

# What the loaders read, so a download skips everything else (other formats, ONNX, GGUF...).
_HUB_FILES = ["config.json", "params.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
_HUB_WEIGHTS = (["model.safetensors", "model-*.safetensors", "model.safetensors.index.json"],  # preferred
                ["pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json",
                 "consolidated.*.pth"])


@functools.lru_cache(maxsize=None)
def _download(repo_id: str) -> Path:
    """The Hub repo's loader files in the standard Hugging Face cache (downloaded once; with
    HF_HUB_OFFLINE=1 the cached copy is used). Safetensors are fetched; .bin only if there are none."""
    try:
        import huggingface_hub as hub
        from huggingface_hub import errors
    except ImportError:
        raise CheckpointNotFound(f"{repo_id}: not a local directory; to download it from the Hugging Face Hub, "
                                 "pip install huggingface_hub") from None
    try:
        for weights in _HUB_WEIGHTS:
            path = Path(hub.snapshot_download(repo_id, allow_patterns=_HUB_FILES + weights))
            if any(path.glob("*.safetensors")) or any(path.glob("*.bin")) or any(path.glob("*.pth")):
                return path
        return path  # no weights at all: from_pretrained names what is missing
    except errors.GatedRepoError:  # a subclass of RepositoryNotFoundError: test it first
        raise CheckpointError(f"{repo_id} is gated on the Hugging Face Hub: accept its licence on "
                              f"https://huggingface.co/{repo_id}, then log in (`hf auth login` or HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointNotFound(f"{repo_id}: no such local directory, and no such model on the Hugging Face Hub "
                                 "(a private one needs `hf auth login` or HF_TOKEN)") from None
    except errors.LocalEntryNotFoundError:
        raise CheckpointNotFound(f"{repo_id}: not in the Hugging Face cache, and the Hub cannot be reached "
                                 "(offline, or HF_HUB_OFFLINE=1): connect once to download it") from None
    except (errors.HFValidationError, errors.HfHubHTTPError) as e:
        raise CheckpointError(f"{repo_id}: cannot download from the Hugging Face Hub: {str(e).splitlines()[0]}") from None


# The project's tiny base, which pretrain.py builds (and train.py --base tiny on first use): one
# directory per pretraining length, so that a base only serves runs that asked for as many steps.
TINY_BASE = Path(os.environ.get("TEAMLORA_CACHE", Path(__file__).parent / "cache")) / "tiny-base"


def tiny_dir(steps: int = 700) -> Path:
    """Where the tiny base of `steps` pretraining steps is (or will be) cached."""
    return TINY_BASE / f"{steps}-steps"


def resolve_base(name_or_path, tiny_steps: int = 700) -> Path:
    """A local checkpoint directory as it is, else a Hugging Face Hub id ("org/name") fetched into the
    Hugging Face cache; "tiny": the tiny base of tiny_steps pretraining steps, once pretrain.py built
    it. A base is stored in configs as the user gave it, so a Hub id stays an id."""
    if str(name_or_path) == "tiny":
        path = tiny_dir(tiny_steps)
        if not (path / "params.json").exists():
            raise CheckpointNotFound(f"tiny: the tiny base of {tiny_steps} pretraining steps is not built yet "
                                     f"(python pretrain.py --steps {tiny_steps} builds it into {path})")
        return path
    path = Path(name_or_path)
    if path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        if not path.exists():
            raise CheckpointNotFound(f"{name_or_path}: no such checkpoint directory (nor a Hub id: org/name)")
        return path
    return _download(str(name_or_path))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("checkpoint", help="the base: a checkpoint directory (Hugging Face or Meta layout), a Hub "
                        "id, or 'tiny' (pretrain.py's tiny base); a run's adapters: eval.py --ckpt OUT --prompt")
    parser.add_argument("--prompt", default="The capital of France is", help="the text to continue (greedy)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="at most this many tokens are generated")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    gpu = torch.cuda.is_available()
    dtype, device = (torch.bfloat16, "cuda") if gpu else (torch.float32, "cpu")
    tokenizer = load_tokenizer(args.checkpoint)  # the tokenizer first: a broken one is reported before the weights load
    model = Transformer.from_pretrained(args.checkpoint, dtype, device)
    prompt = tokenizer.encode(args.prompt, bos=True, eos=False)
    [new] = model.generate([prompt], args.max_new_tokens, eos_id=tokenizer.eos_id)  # greedy
    print(args.prompt + tokenizer.decode(new))


if __name__ == "__main__":
    try:  # common.cli's handling of a user's mistake, without importing common.py (which imports this file)
        main()
        sys.stdout.flush()  # here, not at exit: a closed pipe is then caught below
    except (CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # the output's reader stopped early: end quietly, as common.cli does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)  # 128 + SIGPIPE: what a shell reports for a program a closed pipe ended
