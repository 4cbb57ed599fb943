"""export.py: adapters trained on a Hugging Face base, exported, and loaded into a Hugging Face-named
LLaMA (plain torch, rotate-half RoPE) give this project's outputs; the CLI commands end to end.

    python -m pytest -q tests/test_export.py
"""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from test_model import hf_state, tiny, tokens, write_hf

import data
import teamlora
import common
from common import UserError
from export import export_adapters, to_rotate_half
from model import RMSNorm, Transformer, _unpermute_hf, ffn_hidden_dim, load_tokenizer, rope_frequencies

ROOT = Path(__file__).resolve().parent.parent
META_TARGETS = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
HF_TARGETS = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class HFLlama(nn.Module):
    """LLaMA under Hugging Face's module names with rotate-half RoPE (transformers' layout), in plain torch."""

    def __init__(self, args):
        super().__init__()
        self.args, d, hd = args, args.dim, args.dim // args.n_heads
        kv = (args.n_kv_heads or args.n_heads) * hd
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(args.vocab_size, d)
        self.model.layers = nn.ModuleList()
        for _ in range(args.n_layers):
            layer = nn.Module()
            layer.self_attn, layer.mlp = nn.Module(), nn.Module()
            for name, (i, o) in dict(q_proj=(d, d), k_proj=(d, kv), v_proj=(d, kv), o_proj=(d, d)).items():
                setattr(layer.self_attn, name, nn.Linear(i, o, bias=False))
            h = ffn_hidden_dim(args)
            for name, (i, o) in dict(gate_proj=(d, h), up_proj=(d, h), down_proj=(h, d)).items():
                setattr(layer.mlp, name, nn.Linear(i, o, bias=False))
            layer.input_layernorm, layer.post_attention_layernorm = RMSNorm(d, args.norm_eps), RMSNorm(d, args.norm_eps)
            self.model.layers.append(layer)
        self.model.norm = RMSNorm(d, args.norm_eps)
        self.lm_head = nn.Linear(d, args.vocab_size, bias=False)

    def forward(self, x):
        a, (B, T) = self.args, x.shape
        hd, H, Hkv = a.dim // a.n_heads, a.n_heads, a.n_kv_heads or a.n_heads
        angles = torch.outer(torch.arange(T, dtype=torch.float32), rope_frequencies(a)).repeat(1, 2)  # (T, hd)

        def rope(t):  # rotate-half: dims i and i + hd/2 form a pair
            return t * angles.cos() + torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1) * angles.sin()

        h = self.model.embed_tokens(x)
        for layer in self.model.layers:
            at, y = layer.self_attn, layer.input_layernorm(h)
            q = rope(at.q_proj(y).view(B, T, H, hd).transpose(1, 2))  # (B, H, T, hd)
            k = rope(at.k_proj(y).view(B, T, Hkv, hd).transpose(1, 2)).repeat_interleave(H // Hkv, 1)
            v = at.v_proj(y).view(B, T, Hkv, hd).transpose(1, 2).repeat_interleave(H // Hkv, 1)
            h = h + at.o_proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, -1))
            y = layer.post_attention_layernorm(h)
            h = h + layer.mlp.down_proj(F.silu(layer.mlp.gate_proj(y)) * layer.mlp.up_proj(y))
        return self.lm_head(self.model.norm(h))


def trained(method, base_dir, targets=META_TARGETS, dropout=0.05):
    """The project's model on an HF-layout base with adapters whose B are non-zero (as after training)."""
    model = Transformer.from_pretrained(base_dir)
    torch.manual_seed(1)
    teamlora.add_adapters(model, method, rank=2, experts=3, alpha=8.0, dropout=dropout, targets=targets)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.2)
    config = dict(method=method, rank=2, experts=3, alpha=8.0, dropout=dropout, targets=targets, router=None,
                  base=str(base_dir))
    return model.eval(), config


def load_exported(ref, out):
    """The README recipes, with teamlora.py standing in for PEFT's LoRA (real PEFT: see the held-out check)."""
    if (out / "teamlora_config.json").exists():
        teamlora.add_adapters(ref, **json.loads((out / "teamlora_config.json").read_text())).eval()
        teamlora.load_adapter_state_dict(ref, load_file(out / "adapter_model.safetensors"))
        return
    peft = json.loads((out / "adapter_config.json").read_text())
    teamlora.add_adapters(ref, "lora", peft["r"], alpha=peft["lora_alpha"], dropout=peft["lora_dropout"],
                          targets=peft["target_modules"]).eval()
    state = load_file(out / "adapter_model.safetensors")
    teamlora.load_adapter_state_dict(ref, {k.removeprefix("base_model.model.").removesuffix(".weight"): t
                                           for k, t in state.items()})


def test_rotate_half_inverts_the_loaders_unpermute():
    w = torch.randn(3, 32, 5)  # (experts, d_out, r): rows along dim -2
    for heads in (1, 2, 4):
        torch.testing.assert_close(to_rotate_half(_unpermute_hf(w[0], heads), heads), w[0])
        torch.testing.assert_close(torch.stack([_unpermute_hf(t, heads) for t in to_rotate_half(w, heads)]), w)


@pytest.mark.parametrize("method", teamlora.METHODS)
def test_exported_adapters_in_a_hugging_face_llama_give_the_same_logits(method, tmp_path):
    base = tiny()  # GQA (4 query heads, 2 kv heads): q and k rows are permuted with different head counts
    base_dir = write_hf(base, tmp_path / "base")
    ref = HFLlama(base.args)
    ref.load_state_dict(hf_state(base))
    x = tokens()
    model, config = trained(method, base_dir)
    torch.testing.assert_close(ref(x), Transformer.from_pretrained(base_dir)(x), atol=1e-5, rtol=1e-5)
    export_adapters(model, config, tmp_path / "out")
    load_exported(ref, tmp_path / "out")
    assert (ref(x) - Transformer.from_pretrained(base_dir)(x)).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(ref(x), model(x), atol=1e-5, rtol=1e-5)


def test_peft_directory_and_routed_config(tmp_path):
    base_dir = write_hf(tiny(), tmp_path / "base")
    export_adapters(*trained("lora", base_dir, targets=["wq", "w1", "w2", "gate_proj"]), tmp_path / "lora")
    peft = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert {k: peft[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
                                 "base_model_name_or_path", "bias", "fan_in_fan_out", "use_rslora", "use_dora")} == \
        dict(peft_type="LORA", task_type="CAUSAL_LM", r=2, lora_alpha=8.0, lora_dropout=0.05,
             target_modules=["down_proj", "gate_proj", "q_proj"], base_model_name_or_path=str(base_dir),
             bias="none", fan_in_fan_out=False, use_rslora=False, use_dora=False)
    state = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    assert state["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"].shape == (2, 64)
    assert state["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"].shape == (64, 2)
    assert len(state) == 2 * 2 * 3  # A and B, 2 layers, 3 targets

    export_adapters(*trained("teamlora", base_dir, targets=["w1", "wk"]), tmp_path / "team")
    assert json.loads((tmp_path / "team" / "teamlora_config.json").read_text()) == dict(
        method="teamlora", rank=2, experts=3, alpha=8.0, dropout=0.05, targets=["gate_proj", "k_proj"],
        router="shapley")  # the default router, written out
    assert set(load_file(tmp_path / "team" / "adapter_model.safetensors")) == {
        f"model.layers.{i}.{m}.{leaf}" for i in range(2) for m in ("mlp.gate_proj", "self_attn.k_proj")
        for leaf in ("lora_A", "lora_B", "router.lora_gate", "router.lora_M")}


def test_meta_base_and_full_fine_tuning(tmp_path):
    tiny().save_pretrained(tmp_path / "meta")
    model = Transformer.from_pretrained(tmp_path / "meta")
    config = dict(method="full", rank=8, experts=4, alpha=32.0, dropout=0.0, targets=["w1"], router=None,
                  base=str(tmp_path / "meta"))
    with pytest.raises(UserError, match="no adapters"):
        export_adapters(model, config, tmp_path / "full")
    teamlora.add_adapters(model, "hydralora", 2, 2, targets=["w1"])
    export_adapters(model, config | dict(method="hydralora"), tmp_path / "out")
    assert "convert_llama_weights_to_hf" in (tmp_path / "out" / "README.md").read_text()


# ---- the commands: train.py, then eval.py --export and eval.py --prompt -----------------------

WORDS = "red green blue cat dog bird one two three tree river stone wind fire rain".split()


def run(*cmd):
    res = subprocess.run([sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=240,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def copy_task(tmp_path, n):
    """A one-task mixture of n "repeat the last word" examples and a tiny random Hugging Face-layout
    base whose tokenizer knows the template; returns the base's directory."""
    rng = random.Random(0)
    with open(tmp_path / "mix.jsonl", "w") as f:
        for _ in range(n):
            words = rng.sample(WORDS, 4)
            f.write(json.dumps({"task": "copy", "instruction": "Repeat the last word.", "input": " ".join(words),
                                "output": words[-1]}) + "\n")
    base_dir = tmp_path / "base"
    data.train_tokenizer([" ".join(rng.sample(WORDS, 6)) for _ in range(200)]
                         + ["### Instruction:\nRepeat the last word.\n\n### Input:\n\n\n### Response:\n"] * 20,
                         base_dir / "tokenizer", vocab_size=300)
    write_hf(tiny(vocab_size=load_tokenizer(base_dir).n_words), base_dir)
    return base_dir


def test_commands_export_and_generate(tmp_path):
    base_dir = copy_task(tmp_path, 16)
    out = tmp_path / "run"
    run("train.py", "--base", str(base_dir), "--data", str(tmp_path / "mix.jsonl"), "--out", str(out),
        "--method", "teamlora", "--rank", "2", "--experts", "2", "--targets", "wq,wk,w2", "--seq-len", "64",
        "--batch-size", "4", "--grad-accum", "1", "--max-steps", "2", "--lr", "1e-2", "--no-eval")
    run("eval.py", "--ckpt", str(out), "--export", str(tmp_path / "exported"))
    config = json.loads((tmp_path / "exported" / "teamlora_config.json").read_text())
    assert config["targets"] == ["down_proj", "k_proj", "q_proj"] and config["router"] == "shapley"

    model, tok, _ = common.load_run(out)
    ref = HFLlama(model.args)
    ref.load_state_dict(hf_state(tiny(vocab_size=tok.n_words)))
    load_exported(ref, tmp_path / "exported")
    x = tokens()
    torch.testing.assert_close(ref(x), model(x), atol=1e-5, rtol=1e-5)

    prompt = "Repeat the last word. red cat"
    [new] = model.generate([tok.encode(prompt, bos=True, eos=False)], 6, eos_id=tok.eos_id)
    printed = run("eval.py", "--ckpt", str(out), "--prompt", prompt, "--max-new-tokens", "6")
    assert printed == prompt + tok.decode(new) + "\n"


def test_export_reads_no_weight_of_the_base(tmp_path, monkeypatch):
    """eval.py --export builds the base on the meta device: not one weight file is read, and the
    files it writes are those of an export from the fully loaded run."""
    import eval as evaluation
    import model as model_py
    import train

    base_dir = copy_task(tmp_path, 8)
    out = tmp_path / "run"
    train.main(["--base", str(base_dir), "--data", str(tmp_path / "mix.jsonl"), "--out", str(out), "--method",
                "teamlora", "--rank", "2", "--experts", "2", "--targets", "wq,w2", "--seq-len", "64", "--batch-size",
                "4", "--max-steps", "1", "--lr", "1e-2", "--no-eval"])
    export_adapters(common.load_run(out)[0], json.loads((out / "summary.json").read_text())["config"], tmp_path / "ref")

    def refuse(file):
        raise AssertionError(f"{file} was read")

    monkeypatch.setattr(model_py, "_read", refuse)
    evaluation.main(["--ckpt", str(out), "--export", str(tmp_path / "meta")])
    ref, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ref", "meta"))
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)
    assert len(ref) == 2 * 2 * 4  # 2 layers x (wq, w2) x (lora_A, lora_B, the router's lora_gate and lora_M)
    ref_config, got_config = ((tmp_path / d / "teamlora_config.json").read_text() for d in ("ref", "meta"))
    assert ref_config == got_config
