"""The analyses of the experts: teamlora's knock-out against a hand-computed layer, the interaction
summary and the new routing statistics on known numbers, eval.py --knockout end to end.

    python -m pytest -q tests/test_analyses.py
"""
import json
import math
import shutil

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_eval import SEQ_LEN, first_per_task, routed, run_dir  # noqa: F401 (run_dir: a fixture)

import analyses
import common
import eval as ev
import report
import teamlora
from model import ModelArgs, Transformer


@pytest.mark.parametrize("total,w,expected", [
    # softmax weights (total 1)
    (1.0, [0.5, 0.3, 0.2], {("top1", None): [1, 0, 0], ("drop", 0): [0, 0.6, 0.4], ("drop", 2): [0.625, 0.375, 0],
                            ("alone", 1): [0, 1, 0]}),
    # shapley weights (total k = 3), one below zero
    (3.0, [2.0, 1.5, -0.5], {("top1", None): [3, 0, 0], ("drop", 2): [12 / 7, 9 / 7, 0],
                             ("drop", 0): [0, 4.5, -1.5], ("alone", 2): [0, 0, 3]}),
])
def test_knock_out_on_hand_computed_weights(total, w, expected):
    for variant, want in expected.items():
        got = teamlora.knock_out(torch.tensor([w]), variant, total)
        torch.testing.assert_close(got, torch.tensor([want], dtype=torch.float32), msg=str(variant))


def test_knock_out_drop_guard_bounds_weights_that_cancel():
    # the kept weights sum to ~0: the bare formula would give ~k / 1e-9; the guard caps sum |w'| at total / tau
    w = torch.tensor([[2.0, 1.0, -1.0 + 1e-9]])
    out = teamlora.knock_out(w, ("drop", 0), 3.0)
    assert out.abs().sum() <= 3.0 / teamlora.Router.tau + 1e-4 and out[0, 0] == 0


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Linear(6, 5, bias=True)


@pytest.mark.parametrize("method", ["teamlora", "moelora", "hydralora"])
@pytest.mark.parametrize("router", ["softmax", "shapley"])
def test_set_knockout_against_a_hand_computed_layer(method, router):
    torch.manual_seed(0)
    model = teamlora.add_adapters(Layer(), method, rank=2, experts=3, targets=("w1",), router=router, dropout=0.0)
    layer = model.w1
    with torch.no_grad():
        for n, p in layer.named_parameters():
            if n.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "lora_gate"):
                p.copy_(torch.randn(p.shape))
    x = torch.randn(4, 6)
    before = layer(x)
    # the definition, expert by expert: y = W0 x + b + s sum_i w_i B_i A_i x, with A_i, B_i per method
    A, B = layer.lora_A, layer.lora_B  # per expert: A (k, r, d_in), B (k, d_out, r)
    if method == "teamlora":
        A, B = A.view(3, 2, 6), B.view(5, 3, 2).permute(1, 0, 2)
    elif method == "hydralora":
        A = A.expand(3, 2, 6)
    w = layer.router(x)  # (4, k)
    T = 1.0 if router == "softmax" else 3.0
    hand = {("top1", None): T * F.one_hot(w.argmax(-1), 3).float(),
            ("drop", 1): T * w * torch.tensor([1.0, 0, 1]) / (w[:, [0, 2]].sum(-1, keepdim=True)),
            ("alone", 2): T * torch.tensor([[0.0, 0, 1]]).expand(4, 3)}
    for variant, weights in hand.items():
        assert teamlora.set_knockout(model, variant) == 3
        want = F.linear(x, layer.weight, layer.bias) + layer.scale * sum(
            weights[:, i:i + 1] * (x @ A[i].T @ B[i].T) for i in range(3))
        torch.testing.assert_close(layer(x), want, msg=str(variant))
        torch.testing.assert_close(layer.last_weights, weights)  # routing statistics see what was used
    teamlora.set_knockout(model, None)
    assert torch.equal(layer(x), before)  # off again: bit-identical


def test_knockout_off_is_bit_identical_on_a_model(sp_tokenizer):
    torch.manual_seed(0)
    model = routed(Transformer(ModelArgs(dim=32, n_layers=2, n_heads=4, vocab_size=sp_tokenizer.n_words,
                                         hidden_dim=48, max_seq_len=SEQ_LEN)))
    tokens = torch.randint(0, sp_tokenizer.n_words, (2, 9))
    fresh = model(tokens)
    weights = [layer.last_weights.clone() for _, layer in teamlora.adapter_layers(model)]
    teamlora.set_knockout(model, ("drop", 0))
    assert not torch.equal(model(tokens), fresh)
    teamlora.set_knockout(model, None)
    assert torch.equal(model(tokens), fresh)
    assert all(torch.equal(a, layer.last_weights) for a, (_, layer) in zip(weights, teamlora.adapter_layers(model)))


def test_set_knockout_refuses_bad_variants_and_unrouted_models():
    model = teamlora.add_adapters(Layer(), "teamlora", rank=2, experts=3, targets=("w1",))
    for bad in [("drop", 3), ("alone", -1), ("top1", 0), ("drop", None), ("best", 1)]:
        with pytest.raises(ValueError, match="variant"):
            teamlora.set_knockout(model, bad)
    with pytest.raises(ValueError, match="no routed"):
        teamlora.set_knockout(teamlora.add_adapters(Layer(), "lora", rank=2, targets=("w1",)), None)


def test_interaction_summary_on_known_matrices():
    model = nn.ModuleDict({"a": Layer(), "b": Layer()})
    teamlora.add_adapters(model, "teamlora", rank=2, experts=3, targets=("w1",))
    E = torch.tensor([[0.0, 0.3, 0.0], [-0.4, 0.0, 0.0], [0.0, 0.0, 0.0]])
    with torch.no_grad():
        model["a"].w1.router.lora_M.copy_(torch.eye(3) + E)
        model["b"].w1.router.lora_M.copy_(torch.eye(3) * 1.2 - E)  # mean over the two: 1.1 I, off-diagonal 0
    s = teamlora.interaction_summary(model)
    a = s["layers"]["a.w1"]
    assert a["identity_distance"] == pytest.approx(0.5) and a["off_diagonal"] == pytest.approx(0.5)
    assert a["diagonal_drift"] == pytest.approx(0.0)
    b = s["layers"]["b.w1"]
    assert b["identity_distance"] == pytest.approx(math.sqrt(0.25 + 3 * 0.04)) and b["diagonal_drift"] == pytest.approx(
        math.sqrt(3 * 0.04))
    assert s["mean"]["off_diagonal"] == pytest.approx(0.0, abs=1e-7)
    assert s["mean"]["identity_distance"] == pytest.approx(math.sqrt(3 * 0.01))
    assert s["init_off_diagonal"] == pytest.approx(0.2 * math.sqrt(6 / 12))
    # analyses' reading of the mean M: raises / lowers as [j, i, M_ij]
    with torch.no_grad():
        model["b"].w1.router.lora_M.copy_(torch.eye(3) + E)
    read = analyses.interaction(model)
    assert read["raises"] == [[1, 0, pytest.approx(0.3)]] and read["lowers"] == [[0, 1, pytest.approx(-0.4)]]
    soft = teamlora.add_adapters(Layer(), "teamlora", rank=2, experts=3, targets=("w1",), router="softmax")
    assert teamlora.interaction_summary(soft) == {} and analyses.interaction(soft) == {}


def test_routing_top_half_and_normalised_entropy_by_hand(sp_tokenizer, builtin_mixture):
    tok = sp_tokenizer
    torch.manual_seed(0)
    model = routed(Transformer(ModelArgs(dim=32, n_layers=1, n_heads=4, vocab_size=tok.n_words, hidden_dim=48,
                                         max_seq_len=SEQ_LEN)), "moelora")
    examples = [ex for ex in first_per_task(builtin_mixture[1], 2) if ex.task == "spam"]
    stats = ev.routing_by_task(model, tok, examples, SEQ_LEN, batch_size=1)["spam"]
    tops, ents = {}, {}
    for name, layer in teamlora.adapter_layers(model):  # by hand: one forward per example, all its tokens
        shares = []
        for ex in examples:
            model(torch.tensor([ev.encode_example(tok, ex, SEQ_LEN)[0]]))
            shares.append(layer.last_weights[0])
        p = torch.cat(shares)  # (tokens, k), softmax: shares
        tops[name] = (p.max(-1).values > 0.5).float().mean().item()
        ents[name] = -torch.special.xlogy(p, p).sum(-1).mean().item() / math.log(3)
    assert stats["layers_top_half"] == pytest.approx(tops) and stats["layers_entropy_norm"] == pytest.approx(ents)
    assert stats["top_half"] == pytest.approx(sum(tops.values()) / 3)
    assert stats["entropy_norm"] == pytest.approx(stats["entropy"] / math.log(3))
    text = report.format_table({"tasks": {}, "average": None, "majority": {"average": None, "tasks": {}},
                            "routing": {"spam": stats}})
    assert "top>1/2" in text and "per layer (3 layers" in text


def test_eval_knockout_end_to_end_and_a_lora_refusal(run_dir, tmp_path, capsys):  # noqa: F811
    run, _ = run_dir
    ev.main(["--ckpt", str(run), "--limit", "3", "--batch-size", "8", "--max-new-tokens", "2", "--knockout"])
    printed = capsys.readouterr().out
    result = json.loads((run / "eval.json").read_text())
    ko = result["knockout"]
    assert list(ko["variants"]) == ["all", "top1", "drop0", "drop1", "drop2", "alone0", "alone1", "alone2"]
    assert ko["variants"]["all"]["average"] == result["average"]
    top1 = ko["variants"]["top1"]["average"]
    assert ko["top1_keeps_pct"] == (pytest.approx(100 * top1 / result["average"]) if result["average"] else None)
    assert set(ko["variants"]["top1"]["tasks"]) == set(result["tasks"])
    assert "knock-out" in printed and "top-1 keeps" in printed and "interaction matrix" in printed
    assert len(result["interaction"]["layers"]) == 6  # w1, w2, w3 in 2 blocks, shapley routers
    # the routers were restored: a plain evaluation gives the all-experts scores again
    ev.main(["--ckpt", str(run), "--limit", "3", "--batch-size", "8", "--max-new-tokens", "2"])
    again = json.loads((run / "eval.json").read_text())
    assert again["tasks"] == result["tasks"] and "knockout" not in again
    # --compare gains the top-1 column when a run has it
    other = tmp_path / "ko"
    shutil.copytree(run, other)
    (other / "eval.json").write_text(json.dumps(result))
    summary = json.loads((other / "summary.json").read_text())
    summary["config"]["seed"] += 1  # another seed of the setup, not a copy of the run
    (other / "summary.json").write_text(json.dumps(summary))
    table = report.compare([str(run), str(other)])
    assert "top1_keeps%" in table.splitlines()[0]
    # a LoRA run is refused in one line before any weights load
    lora = tmp_path / "lora"
    shutil.copytree(run, lora)
    ckpt = torch.load(lora / "checkpoint.pt", weights_only=True)
    torch.save({**ckpt, "config": {**ckpt["config"], "method": "lora"}}, lora / "checkpoint.pt")
    capsys.readouterr()  # the progress bars so far
    with pytest.raises(SystemExit) as e:
        common.cli(ev.main, ["--ckpt", str(lora), "--knockout"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: --knockout") and "Traceback" not in err, err


def test_pictures(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws the pictures")
    model = nn.ModuleDict({"a": Layer(), "b": Layer()})
    teamlora.add_adapters(model, "teamlora", rank=2, experts=3, targets=("w1",))
    analyses.save_interaction(analyses.interaction(model), tmp_path / "interaction.png")
    layer = {"layers": {"a.w1": [0.5, 0.3, 0.2]}, "layers_top_half": {"a.w1": 0.4},
             "layers_entropy_norm": {"a.w1": 0.9}}
    routing = {"spam": {**layer, "tokens": 10}, "nli": {**layer, "tokens": 5}}
    analyses.save_layer_heatmap(routing, tmp_path / "layers.png")
    for name in ("interaction.png", "layers.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")
