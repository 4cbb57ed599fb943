"""Quantized bases (issue 24): teamlora.py on bitsandbytes' 4-bit and 8-bit layers and on any nn.Linear
subclass; the copied teamlora.py on a 4-bit Hugging Face Llama; train.py --quantize end to end.
bitsandbytes runs these layers on a CPU; tests that need it (or transformers) skip without it."""
import importlib.util
import json
import random
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common
import data
import eval as evaluation
import runs
import teamlora as tl
import train
from model import ModelArgs, Transformer, load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
try:
    import bitsandbytes as bnb
except ImportError:
    bnb = None
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed (pip install bitsandbytes)")
ARGS = ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=128, max_seq_len=32)


def quantized_model(kind="nf4", seed=0):
    """A tiny random project Transformer, its block layers quantized as train.py --quantize does."""
    torch.manual_seed(seed)
    return common.quantize_base(Transformer(ARGS), kind, "cpu").eval()


def adapter_tensors(model):
    return {n: p for n, p in model.named_parameters() if n.rsplit(".", 1)[-1].startswith(tl.PREFIX)}


def randomize(model, seed=1):
    """Fresh B are zero (no gradient reaches A or the router); nonzero adapters make every tensor count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in adapter_tensors(model).items():
            if not n.endswith("lora_M"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def steps(model, tokens, n=6, lr=5e-2):
    """n AdamW steps on one batch (next-token loss); the losses."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(n):
        loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@needs_bnb
@pytest.mark.parametrize("method", tl.METHODS)
def test_every_method_on_4bit_layers(method):
    # Train mode throughout but for the last check: in eval mode, bitsandbytes 0.50.2 on an AVX512-BF16 CPU
    # switches a Linear4bit whose input needs no gradient to a packed inference kernel (other rounding).
    model = quantized_model().train()
    tokens = torch.randint(0, ARGS.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    before, keys = model(tokens[:, :-1]), set(model.state_dict())
    assert isinstance(model.layers[0].feed_forward.w1, bnb.nn.Linear4bit)
    targets = ("w1", "w2", "w3", "wq")
    tl.add_adapters(model, method, rank=2, experts=2, dropout=0.0, targets=targets)
    assert torch.equal(model(tokens[:, :-1]), before)  # B = 0: unchanged at init, the base's forward used
    # The base's entries keep their names, bitsandbytes' quant state included (w1.weight.absmax, ...).
    assert {k for k in model.state_dict() if tl.PREFIX not in k} == keys
    assert any(k.endswith("w1.weight.absmax") for k in keys)
    # A packed weight counts as the matrix it stands for: the base has as many parameters as unquantized.
    assert tl.parameter_report(model)["base"] == sum(p.numel() for p in Transformer(ARGS).parameters())
    for _, layer in tl.adapter_layers(model):  # float32 adapters, whatever the packed weight's dtype
        assert layer.weight.dtype == torch.uint8 and layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    randomize(model)
    model(tokens[:, :-1], tokens[:, 1:]).backward()
    for n, p in adapter_tensors(model).items():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    model.zero_grad()
    losses = steps(model, tokens)
    assert losses[-1] < losses[0] - 0.2, losses
    again = tl.add_adapters(quantized_model(), method, rank=2, experts=2, dropout=0.0, targets=targets)
    tl.load_adapter_state_dict(again, tl.adapter_state_dict(model))
    with torch.no_grad():
        assert torch.equal(again.eval()(tokens[:, :-1]), model.eval()(tokens[:, :-1]))


@needs_bnb
def test_merge_refused_on_a_quantized_base_before_any_layer_changes():
    model = quantized_model()
    model.output = nn.Linear(ARGS.dim, ARGS.vocab_size, bias=False)  # one plain layer among 4-bit ones
    tl.add_adapters(model, "lora", rank=2, targets=("output", "w1"))
    randomize(model)
    w0 = model.output.weight.clone()
    with pytest.raises(ValueError, match="layers.0.feed_forward.w1 .* Linear4bit, not a plain nn.Linear"):
        tl.merge_adapters(model)
    assert torch.equal(model.output.weight, w0) and not model.output.merged


@needs_bnb
def test_8bit_layers_keep_their_state_dict_and_load_it_back():
    tokens = torch.randint(0, ARGS.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    source = quantized_model("int8")
    saved, before = source.state_dict(), source(tokens)
    assert "layers.0.feed_forward.w1.SCB" in saved
    model = tl.add_adapters(quantized_model("int8", seed=1), "teamlora", rank=2, experts=2)  # other weights
    assert {k for k in model.state_dict() if tl.PREFIX not in k} == set(saved)
    result = model.load_state_dict(saved, strict=False)  # SCB and weight_format through Linear8bitLt's own loader
    assert not result.unexpected_keys and all(tl.PREFIX in k for k in result.missing_keys)
    assert torch.equal(model(tokens), before)


@needs_bnb
def test_4bit_state_dict_loads_after_injection_as_before():
    saved = quantized_model().state_dict()
    plain = quantized_model(seed=1).load_state_dict(saved, strict=False)
    adapted = tl.add_adapters(quantized_model(seed=1), "lora", rank=2).load_state_dict(saved, strict=False)
    # bitsandbytes' Linear4bit leaves its quant-state entries unexpected (transformers' loader reads them).
    assert adapted.unexpected_keys == plain.unexpected_keys and plain.unexpected_keys
    assert all(tl.PREFIX in k for k in adapted.missing_keys) and not plain.missing_keys


class Shifted(nn.Linear):
    """A subclass of nn.Linear whose forward is its own (no bitsandbytes needed)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + 1.0


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w2 = Shifted(8, 12), nn.Linear(12, 8)

    def forward(self, x):
        return self.w2(torch.relu(self.w1(x)))


@pytest.mark.parametrize("method", tl.METHODS)
def test_a_subclass_keeps_its_own_forward_names_and_tensors(method):
    torch.manual_seed(0)
    model, x = TwoLayers(), torch.randn(3, 8)
    before, keys = model(x), set(model.state_dict())
    tl.add_adapters(model, method, rank=2, experts=2, targets=("w1", "w2"))
    w1 = model.w1
    assert type(w1.base) is Shifted and model.w2.base is None  # a plain nn.Linear keeps F.linear
    assert "base" not in dict(model.named_children()) and "w1.base.weight" not in model.state_dict()
    assert {k for k in model.state_dict() if tl.PREFIX not in k} == keys
    assert torch.equal(model.eval()(x), before)  # the + 1 of Shifted's forward is there
    assert not w1.base.training  # train()/eval() reach the base
    model.double()  # a conversion: the base computes with the wrapper's (new) tensors
    assert w1.base.weight is w1.weight and w1.weight.dtype == torch.float64
    model.float().load_state_dict(TwoLayers().state_dict(), strict=False, assign=True)
    assert w1.base.weight is w1.weight
    if method == "lora":
        with pytest.raises(ValueError, match="Shifted, not a plain nn.Linear"):
            tl.merge_adapters(model)


# ----------------------------------------------------------------------------- the copied teamlora.py, Hugging Face


def hf_llama_4bit(seed=0):
    """transformers' LlamaForCausalLM (tiny, random), its decoder layers' nn.Linear replaced by
    bitsandbytes Linear4bit NF4 as transformers' BitsAndBytesConfig(load_in_4bit=True) does (its
    loader needs accelerate, which the project does not; the layers are the same)."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    for name, linear in [(n, m) for n, m in model.model.layers.named_modules() if type(m) is nn.Linear]:
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", device="meta")
        q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4", module=q)
        parent, _, child = name.rpartition(".")
        setattr(model.model.layers.get_submodule(parent), child, q.to("cpu"))
    return model


@pytest.fixture(scope="module")
def copied(tmp_path_factory):
    """teamlora.py copied alone into a directory and imported from there, as a user's project would."""
    d = tmp_path_factory.mktemp("copied")
    shutil.copy(ROOT / "teamlora.py", d / "teamlora.py")
    spec = importlib.util.spec_from_file_location("copied_teamlora", d / "teamlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_bnb
@pytest.mark.parametrize("method", tl.METHODS)
def test_copied_teamlora_on_a_4bit_hugging_face_llama(copied, method):
    model = hf_llama_4bit()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    keys = set(model.state_dict())
    copied.add_adapters(model, method, rank=2, experts=2, dropout=0.0)  # FFN: gate_proj, up_proj, down_proj
    assert len(copied.adapter_layers(model)) == 3
    assert {k for k in model.state_dict() if copied.PREFIX not in k} == keys
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.2, losses
    again = copied.add_adapters(hf_llama_4bit(), method, rank=2, experts=2, dropout=0.0)
    copied.load_adapter_state_dict(again, copied.adapter_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)


# ----------------------------------------------------------------------------- train.py --quantize


def test_missing_bitsandbytes_is_one_line_naming_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(common.UserError, match=r"--quantize nf4 needs bitsandbytes: pip install bitsandbytes"):
        common.quantize_base(Transformer(ARGS), "nf4", "cpu")


@pytest.mark.parametrize("flags, message", [(["--method", "full"], "--quantize: --method full trains every"),
                                            (["--fsdp"], "--quantize: not with --fsdp")])
def test_full_fine_tuning_or_fsdp_of_a_quantized_base_is_refused(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args([*flags, "--quantize", "nf4"])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A tiny random base and a one-task mixture."""
    tmp = tmp_path_factory.mktemp("quant")
    rng, words = random.Random(0), "red green blue cat dog bird one two three tree".split()
    mix = tmp / "mix"
    mix.mkdir()
    for split, n in (("train", 32), ("test", 6)):
        with open(mix / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                w = rng.sample(words, 4)
                f.write(json.dumps({"task": "color", "instruction": "Is a color first?", "input": " ".join(w),
                                    "output": "yes" if w[0] in ("red", "green", "blue") else "no",
                                    "choices": ["yes", "no"]}) + "\n")
    base = tmp / "base"
    base.mkdir()
    data.train_tokenizer([" ".join(rng.sample(words, 6)) for _ in range(300)] + ["Is a color first? yes no"],
                         base / "tokenizer", vocab_size=320)
    torch.manual_seed(0)
    Transformer(ModelArgs(dim=64, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=load_tokenizer(base).n_words,
                          hidden_dim=128, max_seq_len=128)).save_pretrained(base)
    return base, mix


@needs_bnb
def test_train_quantize_nf4_end_to_end(tiny_run, tmp_path, monkeypatch):
    base, mix = tiny_run
    out = tmp_path / "run"
    flags = ["--base", str(base), "--data", str(mix), "--out", str(out), "--quantize", "nf4", "--rank", "2",
             "--experts", "2", "--seq-len", "96", "--batch-size", "4", "--lr", "1e-2", "--save-every", "2",
             "--max-steps", "4", "--no-eval"]
    save = runs.save

    def save_then_stop(*a, **k):
        save(*a, **k)
        raise KeyboardInterrupt  # the run stops right after its step-2 checkpoint

    monkeypatch.setattr(runs, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train.main(flags)
    monkeypatch.setattr(runs, "save", save)
    train.main(flags + ["--resume"])  # rebuilds the same 4-bit base from the run's config
    ckpt = common.read_checkpoint(out)
    assert ckpt["step"] == 4 and ckpt["config"]["quantize"] == "nf4"
    model, tok, _ = common.load_run(out)
    assert isinstance(model.layers[0].feed_forward.w1.base, bnb.nn.Linear4bit)
    assert isinstance(model.layers[0].attention.wq, bnb.nn.Linear4bit)  # every block layer, adapted or not
    assert type(model.output) is nn.Linear and model.output.weight.dtype == torch.float32
    assert len(model.generate([tok.encode("Is a color first?", bos=True, eos=False)], max_new_tokens=3)[0]) <= 3
    evaluation.main(["--ckpt", str(out)])
    assert json.loads((out / "eval.json").read_text())["tasks"]["color"]["n"] == 6
    evaluation.main(["--ckpt", str(out), "--export", str(tmp_path / "exported")])
    assert "BitsAndBytesConfig(load_in_4bit=True" in (tmp_path / "exported" / "README.md").read_text()
    losses = [json.loads(line)["loss"] for line in open(out / "log.jsonl")]
    assert len(losses) == 4 and all(loss == loss for loss in losses)


@needs_bnb
def test_memory_model_nf4_bytes_are_what_bitsandbytes_stores():
    import memory

    model = common.quantize_base(Transformer(replace(ARGS, dim=1024, hidden_dim=1024, n_heads=8)), "nf4", "cpu")
    state = model.layers[0].feed_forward.w1.state_dict()  # packed weight, absmax per 64, float32 scale per 256 blocks
    keys = ("weight", "weight.absmax", "weight.nested_absmax")
    stored = sum(state[k].numel() * state[k].element_size() for k in keys)
    assert stored == 1024 * 1024 * memory.NF4  # the code tables (16 + 256 values per layer) aside
    n = memory.parameter_counts(ARGS, "lora", 2, 1)
    layers = Transformer(ARGS).layers.modules()
    assert n["block_linear"] == sum(m.weight.numel() for m in layers if isinstance(m, nn.Linear))
    weights = [memory.peak(ARGS, "lora", 2, 1, world=1, nf4=nf4)["weights"] for nf4 in (False, True)]
    assert weights[0] - weights[1] == pytest.approx(n["block_linear"] * (2 - memory.NF4))
