"""bench.py on minuscule shapes, one round: every method present, times positive, ratios agree with the times."""
import pytest
import torch
import torch.nn as nn

import bench

TINY = ["--device", "cpu", "--rank", "2", "--batch", "2", "--seq", "4", "--repeats", "1"]


def check(result, metrics, ks, rank):
    for k in ks:
        table = result["groups"][str(k)]
        expected = [s.label for s in bench.group(k, rank, floor=result["mode"] == "layer")]
        assert list(table) == expected
        for label, cells in table.items():
            for m in metrics:
                value = result["rows"][label][m]
                assert value > 0 and cells[m]["value"] == value
                assert cells[m]["xMoE"] == pytest.approx(value / result["rows"][expected[0]][m])
                assert cells[m]["xLoRA"] == pytest.approx(value / result["rows"][f"LoRA r{k * rank}"][m])
        assert table[expected[0]][metrics[0]]["xMoE"] == pytest.approx(1.0)


def test_layer_mode():
    result = bench.main(["--layer", "--dim", "8", "--hidden", "12", "--experts", "2", *TINY])
    check(result, ["fwd_bwd_ms"], [2], 2)
    assert set(result["targets"]["2"]) == {"xLoRA", "xMoE"}


def test_model_mode(tmp_path):
    out = tmp_path / "bench.json"
    result = bench.main(["--dim", "16", "--hidden", "24", "--layers", "1", "--heads", "2", "--vocab", "32",
                         "--new-tokens", "2", "--experts", "2,4", "--json", str(out), *TINY])
    check(result, ["train_ms", "prefill_ms", "decode_ms_per_token", "train_memory_mib"], [2, 4], 2)
    assert out.exists()
    assert 0 < result["rows"]["LoRA r2"]["trainable_pct"] < result["rows"]["LoRA r8"]["trainable_pct"]


def test_smollm2_shape_sets_gqa_and_tied_embeddings_flags_still_win():
    result = bench.main(["--shape", "smollm2", "--dim", "18", "--hidden", "24", "--layers", "1", "--heads", "3",
                         "--vocab", "32", "--new-tokens", "2", "--experts", "2", *TINY])
    args = result["args"]
    assert (args["kv_heads"], args["tied"], args["dim"]) == (3, True, 18)  # kv heads and tying from the shape
    check(result, ["train_ms", "prefill_ms", "decode_ms_per_token", "train_memory_mib"], [2], 2)


@pytest.mark.parametrize("method", ["moelora", "hydralora"])
def test_published_variants_same_function_more_masks(method):
    """Without dropout the published computations equal teamlora.py's; with it they draw k masks, not one."""
    torch.manual_seed(0)
    x = torch.randn(5, 8)
    layers = {}
    for spec in [bench.Spec("ours", method, 2, 3), bench.Spec("published", f"{method}-published", 2, 3)]:
        torch.manual_seed(1)
        holder = nn.Module()
        holder.w1 = nn.Linear(8, 6, bias=False)
        layers[spec.label] = bench.adapt(holder, spec, dropout=0.5).w1
        nn.init.normal_(layers[spec.label].lora_B)
    assert type(layers["published"]) is bench.PUBLISHED[f"{method}-published"][1]
    for layer in layers.values():
        layer.eval()
    torch.testing.assert_close(layers["published"](x), layers["ours"](x))
    masks = {}
    for label, layer in layers.items():
        layer.train()
        masks[label] = 0
        layer.dropout.register_forward_hook(lambda *_, label=label: masks.__setitem__(label, masks[label] + 1))
        layer(x)
    assert masks == {"ours": 1, "published": 3}
