"""bench.py on minuscule shapes, one round: every method present, times positive, ratios agree with the times."""
import pytest

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
