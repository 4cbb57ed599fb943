"""model.py on tiny random models: KV cache, generation, checkpoint layouts, errors, tokenizer.

    python -m pytest -q tests/test_model.py
"""
import json
import math
import random
import struct
from pathlib import Path

import pytest
import torch

from model import ModelArgs, Tokenizer, Transformer, apply_rotary_emb, ffn_hidden_dim, load_tokenizer

LLAMA31 = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(seed=0, **overrides) -> Transformer:
    args = ModelArgs(**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128, multiple_of=32,
                            max_seq_len=64, rope_theta=500000.0) | overrides)
    torch.manual_seed(seed)
    model = Transformer(args).eval()
    with torch.no_grad():  # norms start at 1; randomise them so a mis-loaded norm shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def tokens(B=2, T=12, seed=1):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_same_logits(a: Transformer, b: Transformer):
    x = tokens()
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


# ---- inference --------------------------------------------------------------------------------

def reference_logits(model: Transformer, x: torch.Tensor) -> torch.Tensor:
    """The forward written out plainly (real-valued RoPE on pairs, k/v repeated per query head,
    softmax attention, norms by hand): what the fused calls in model.py must compute."""
    a = model.args
    hd, n_kv = a.dim // a.n_heads, a.n_kv_heads or a.n_heads
    T = x.shape[1]
    angles = torch.outer(torch.arange(T, dtype=torch.float32), 1.0 / a.rope_theta ** (torch.arange(0, hd, 2) / hd))
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, hd/2)

    def norm(h, w):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + a.norm_eps) * w

    def rope(t):  # (B, T, H, hd)
        even, odd = t[..., 0::2], t[..., 1::2]
        out = torch.empty_like(t)
        out[..., 0::2], out[..., 1::2] = even * cos - odd * sin, even * sin + odd * cos
        return out

    h = model.tok_embeddings.weight[x]
    for layer in model.layers:
        at = layer.attention
        u = norm(h, layer.attention_norm.weight)
        q = rope((u @ at.wq.weight.T).view(*x.shape, a.n_heads, hd)).transpose(1, 2)
        k = rope((u @ at.wk.weight.T).view(*x.shape, n_kv, hd)).repeat_interleave(a.n_heads // n_kv, 2).transpose(1, 2)
        v = (u @ at.wv.weight.T).view(*x.shape, n_kv, hd).repeat_interleave(a.n_heads // n_kv, 2).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(hd)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        h = h + (scores.softmax(-1) @ v).transpose(1, 2).reshape(*x.shape, -1) @ at.wo.weight.T
        u = norm(h, layer.ffn_norm.weight)
        ff = layer.feed_forward
        h = h + (torch.nn.functional.silu(u @ ff.w1.weight.T) * (u @ ff.w3.weight.T)) @ ff.w2.weight.T
    return norm(h, model.norm.weight) @ model.output.weight.T


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_forward_equals_the_plain_math(n_kv_heads):
    model, x = tiny(n_kv_heads=n_kv_heads), tokens(T=10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_logits(model, x), atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_full_forward():
    model, x = tiny(), tokens(T=10)
    full = model(x)
    model.setup_cache(2, 10)
    pieces, pos = [], 0
    for T in (4, 3, 1, 1, 1):  # prefill, a chunk with start_pos > 0 (explicit mask), then one at a time
        pieces.append(model(x[:, pos:pos + T], start_pos=pos))
        pos += T
    model.clear_cache()
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_targets_loss_equals_full_logits_cross_entropy(tied, reduction):
    """forward(tokens, targets) computes the output layer only at target positions: same loss, same grads."""
    x = tokens(T=10)
    targets = torch.full_like(x, -100)
    targets[0, 3], targets[0, 9], targets[1, 5:] = 7, 11, x[1, 5:]  # a few scattered targets per row
    weights = torch.rand(x.shape, generator=torch.Generator().manual_seed(0))  # a backward through every position
    losses, grads = [], []
    for use_targets in (False, True):
        model = tiny(tie_embeddings=tied).train()
        if use_targets:
            loss = model(x, targets, reduction=reduction)
        else:
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten(), reduction=reduction)
            loss = loss.view_as(targets) if reduction == "none" else loss
        (loss if reduction == "mean" else (loss * weights).sum()).backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    if reduction == "none":
        assert losses[1].shape == x.shape and (losses[1][targets == -100] == 0).all()
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-5)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_targets_under_bf16_autocast():
    """Under autocast the (N, vocab) logits are upcast to float32 before the log-softmax."""
    model, x = tiny(), tokens(T=10)
    targets = torch.full_like(x, -100)
    targets[:, -2:] = x[:, :2]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, targets)
        full = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), targets.flatten())
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, full)


def test_last_only_is_the_last_position_of_the_full_logits():
    model, x = tiny(), tokens(T=10)
    last = model(x, last_only=True)
    assert last.shape == (x.shape[0], 1, model.args.vocab_size)
    torch.testing.assert_close(last, model(x)[:, -1:])


def test_generate_batch_equals_each_alone():
    model = tiny()
    prompts = [[5, 9, 17], [3, 1, 4, 1, 5, 9, 2]]
    batch = model.generate(prompts, max_new_tokens=6)
    alone = [model.generate([p], max_new_tokens=6)[0] for p in prompts]
    assert batch == alone and all(len(new) == 6 for new in batch)
    # make row 0's third token the eos: each row stops at its first eos, which is not returned
    eos = batch[0][2]
    stopped = model.generate(prompts, max_new_tokens=6, eos_id=eos)
    assert stopped == [new[:new.index(eos)] if eos in new else new for new in batch] and len(stopped[0]) <= 2
    assert all(layer.attention.cache_k is None for layer in model.layers)


def test_sampling():
    model, prompts = tiny(), [[5, 9, 17], [3, 1, 4, 1]]
    greedy = model.generate(prompts, 5)
    # a nucleus this small holds only the most likely token
    assert model.generate(prompts, 5, temperature=1.0, top_p=1e-6) == greedy
    draw = lambda: model.generate(prompts, 5, temperature=1.5, generator=torch.Generator().manual_seed(7))
    assert draw() == draw()


def test_gradient_checkpointing_same_grads():
    x = tokens()
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        model.gradient_checkpointing = ckpt
        model(x).logsumexp(-1).mean().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_rope_grows_past_max_seq_len_and_stays_float32():
    short, x = tiny(max_seq_len=8), tokens(T=12)
    torch.testing.assert_close(short(x), tiny(max_seq_len=64)(x))
    short.to(torch.bfloat16)(x)
    assert short.cos.dtype == torch.float32


# ---- Hugging Face layout, written here from Meta weights -------------------------------------

HF_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
HF_LAYER = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
            "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
            "feed_forward.w1": "mlp.gate_proj", "feed_forward.w2": "mlp.down_proj", "feed_forward.w3": "mlp.up_proj",
            "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def to_rotate_half(w, n_heads):
    """Meta rows (pairs 2i, 2i+1 in each head) -> HF rows (each head's even rows first, then its odd rows)."""
    return w.view(n_heads, w.shape[0] // n_heads // 2, 2, w.shape[1]).transpose(1, 2).reshape(w.shape)


def hf_state(model: Transformer) -> dict:
    a, out = model.args, {}
    for name, t in model.state_dict().items():
        base = name.removesuffix(".weight")
        if base.startswith("layers."):
            _, i, rest = base.split(".", 2)
            hf = f"model.layers.{i}.{HF_LAYER[rest]}.weight"
        elif base == "output" and a.tie_embeddings:
            continue
        else:
            hf = HF_TOP[base] + ".weight"
        if base.endswith(("wq", "wk")):
            t = to_rotate_half(t, a.n_heads if base.endswith("wq") else a.n_kv_heads)  # GQA: wk has n_kv_heads
        out[hf] = t.clone()
    return out


def hf_config(a: ModelArgs, rope_form: str) -> dict:
    config = dict(model_type="llama", hidden_size=a.dim, num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                  num_key_value_heads=a.n_kv_heads, intermediate_size=ffn_hidden_dim(a), vocab_size=a.vocab_size,
                  rms_norm_eps=a.norm_eps, tie_word_embeddings=a.tie_embeddings, hidden_act="silu",
                  max_position_embeddings=a.max_seq_len, head_dim=a.dim // a.n_heads, attention_bias=False)
    rope = dict(rope_type="llama3", **a.rope_scaling) if a.rope_scaling else dict(rope_type="default")
    if rope_form == "rope_parameters":  # transformers >= 5
        config["rope_parameters"] = dict(rope_theta=a.rope_theta, **rope)
    else:
        config.update(rope_theta=a.rope_theta, rope_scaling=rope)
    return config


def write_safetensors(tensors: dict, file: Path):
    """The format by hand (safetensors' own writer needs numpy): u64 header size, JSON header, raw bytes."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        blob = bytes(t.contiguous().view(torch.uint8).flatten().tolist())
        header[name] = {"dtype": {torch.float32: "F32", torch.bfloat16: "BF16"}[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def write_hf(model: Transformer, path: Path, rope_form="rope_parameters", layout="sharded") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf_config(model.args, rope_form)))
    state = hf_state(model)
    if layout == "bin":
        torch.save(state, path / "pytorch_model.bin")
        return path
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        write_safetensors({k: state[k] for k in keys}, path / file)
    weight_map = {k: file for file, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def expected_freqs(theta, head_dim, scaling):
    """Meta's Llama-3.1 apply_scaling, written as its loop, in float64."""
    out = []
    for i in range(0, head_dim, 2):
        f = theta ** (-i / head_dim)
        if scaling:
            wavelen, orig = 2 * math.pi / f, scaling["original_max_position_embeddings"]
            lo, hi = scaling["low_freq_factor"], scaling["high_freq_factor"]
            if wavelen > orig / lo:
                f /= scaling["factor"]
            elif wavelen >= orig / hi:
                s = (orig / wavelen - lo) / (hi - lo)
                f = (1 - s) * f / scaling["factor"] + s * f
        out.append(f)
    return torch.tensor(out, dtype=torch.float64)


def assert_rope(model: Transformer, theta, scaling):
    angle = torch.atan2(model.sin[1], model.cos[1]).double()  # position 1: the angles are the frequencies
    torch.testing.assert_close(angle, expected_freqs(theta, 16, scaling), rtol=1e-5, atol=0)


def test_rotate_half_layout_is_the_same_rope():
    """HF's rotate-half RoPE on permuted rows gives the same q.k scores as Meta's pairs: checks to_rotate_half."""
    model, x = tiny(rope_scaling=LLAMA31), torch.randn(1, 6, 64)
    wq = model.layers[0].attention.wq.weight
    cos, sin = model.cos[:6], model.sin[:6]
    meta = apply_rotary_emb((x @ wq.T).view(1, 6, 4, 16), cos, sin)
    q = (x @ to_rotate_half(wq, 4).T).view(1, 6, 4, 16)
    c, s = torch.cat((cos, cos), -1)[:, None], torch.cat((sin, sin), -1)[:, None]
    hf = q * c + torch.cat((-q[..., 8:], q[..., :8]), -1) * s
    torch.testing.assert_close(hf @ hf.transpose(-1, -2), meta @ meta.transpose(-1, -2), atol=1e-4, rtol=1e-5)


def test_hf_sharded_safetensors_rope_parameters(tmp_path):
    model = tiny(rope_scaling=LLAMA31)
    loaded = Transformer.from_pretrained(write_hf(model, tmp_path))
    assert_same_logits(loaded, model)
    assert_rope(loaded, 500000.0, LLAMA31)
    assert not loaded.training and all(p.requires_grad for p in loaded.parameters())


def test_hf_bin_tied_rope_scaling(tmp_path):
    model = tiny(rope_scaling=LLAMA31, tie_embeddings=True)
    loaded = Transformer.from_pretrained(write_hf(model, tmp_path, rope_form="rope_scaling", layout="bin"))
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert_same_logits(loaded, model)
    assert_rope(loaded, 500000.0, LLAMA31)
    plain = write_hf(tiny(), tmp_path / "plain", rope_form="rope_scaling")
    assert_rope(Transformer.from_pretrained(plain), 500000.0, None)


# ---- Meta layout -------------------------------------------------------------------------------

@pytest.mark.parametrize("embedding_dim", [1, 0])  # LLaMA-2 splits the embedding along dim, Llama-3 along vocab
def test_meta_two_model_parallel_shards(tmp_path, embedding_dim):
    model = tiny(ffn_dim_multiplier=1.3, rope_scaling=LLAMA31)
    assert ffn_hidden_dim(model.args) == 224  # int(1.3 * int(2 * 256 / 3)) = 221, up to a multiple of 32
    shards = [{"rope.freqs": torch.zeros(8)}, {"rope.freqs": torch.zeros(8)}]
    for name, t in model.state_dict().items():
        if t.ndim == 1:
            parts = [t, t]
        elif name == "tok_embeddings.weight":
            parts = t.chunk(2, embedding_dim)
        else:
            parts = t.chunk(2, 1 if name.endswith(("wo.weight", "w2.weight")) else 0)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, tmp_path / f"consolidated.0{i}.pth")
    params = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=-1 if embedding_dim else 128,
                  multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args.vocab_size == 128
    assert_same_logits(loaded, model)
    assert_rope(loaded, 500000.0, LLAMA31)


def test_save_pretrained_round_trip_and_bfloat16(tmp_path):
    model = tiny(tie_embeddings=True, rope_scaling=LLAMA31)
    model.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path)
    assert loaded.args == model.args and loaded.output.weight is loaded.tok_embeddings.weight
    assert_same_logits(loaded, model)
    half = Transformer.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters()) and half.cos.dtype == torch.float32
    x = tokens()
    assert (half(x) - model(x)).abs().max() < 0.1 * model(x).abs().max()
    tiny(seed=1).save_pretrained(tmp_path)  # the loaded model owns its memory, not the file's pages
    assert_same_logits(loaded, model)


# ---- errors ------------------------------------------------------------------------------------

def edited_checkpoint(path: Path, edit) -> Path:
    tiny().save_pretrained(path)
    state = torch.load(path / "consolidated.00.pth")
    edit(state)
    torch.save(state, path / "consolidated.00.pth")
    return path


@pytest.mark.parametrize("edit, pattern", [
    (lambda s: s.pop("layers.1.feed_forward.w3.weight"), r"missing 1: \['layers.1.feed_forward.w3.weight'\]"),
    (lambda s: s.update({"layers.0.attention.bias": torch.zeros(4)}), r"unexpected 1: .*layers.0.attention.bias"),
    (lambda s: s.update({"norm.weight": torch.ones(63)}), r"norm.weight.*\(63,\).*\(64,\)"),
])
def test_checkpoint_mismatch_errors(tmp_path, edit, pattern):
    with pytest.raises(ValueError, match=pattern):
        Transformer.from_pretrained(edited_checkpoint(tmp_path, edit))


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_corrupt_file_names_itself(tmp_path, layout):
    write_hf(tiny(), tmp_path, layout=layout)
    file = tmp_path / ("model-00002-of-00002.safetensors" if layout == "sharded" else "pytorch_model.bin")
    file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
    with pytest.raises(ValueError, match=file.name):
        Transformer.from_pretrained(tmp_path)


@pytest.mark.parametrize("key, value", [
    ("model_type", "qwen2"), ("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"),
    ("head_dim", 32), ("sliding_window", 32), ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}),
    ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
])
def test_unsupported_config(tmp_path, key, value):
    config = hf_config(tiny().args, "rope_scaling") | {key: value}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"config.json: {key}="):
        Transformer.from_pretrained(tmp_path)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json and params.json"):
        Transformer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf_config(tiny().args, "rope_parameters")))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Transformer.from_pretrained(tmp_path)


# ---- tokenizer ---------------------------------------------------------------------------------

def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat tree quickly slowly red blue 12 345".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(tmp_path / "tokenizer"),
                                   vocab_size=300, byte_fallback=True, split_digits=True, model_type="bpe",
                                   character_coverage=1.0, minloglevel=2)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, Tokenizer) and tok.n_words == 300 and tok.pad_id == tok.eos_id
    text = "the red cat sat on the mat 42 – café"  # unseen characters go through byte fallback
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and tok.bos_id not in ids[1:-1]
    assert tok.decode(ids) == text and tok.encode(text, bos=False, eos=False) == ids[1:-1]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model and tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_text("IQ== 0\nIg== 1\n")  # Meta's Llama-3 tiktoken file
    with pytest.raises(ValueError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    json_dir = tmp_path / "hf"
    json_dir.mkdir()
    (json_dir / "tokenizer.json").write_text("{}")
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install tokenizers"):
            load_tokenizer(json_dir)


def test_command_line_help_shows_the_defaults(capsys):
    import model

    with pytest.raises(SystemExit) as e:
        model.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and "(default: 32)" in text and "(default: The capital of France is)" in text
    assert "'tiny'" in text and "--adapters" not in text  # a run's adapters: eval.py --ckpt OUT --prompt
