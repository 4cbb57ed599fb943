"""teamlora.py on small stand-in models (no project model needed): exactness, API, copyability."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import teamlora as tl


class MetaFFN(nn.Module):
    def __init__(self, d=16, h=24):
        super().__init__()
        self.w1, self.w2, self.w3 = nn.Linear(d, h, bias=False), nn.Linear(h, d, bias=False), nn.Linear(d, h, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class HFBlock(nn.Module):
    """A stand-in with Hugging Face module names, biases, and a non-target linear."""

    def __init__(self, d=16, h=24):
        super().__init__()
        self.self_attn = nn.ModuleDict({"q_proj": nn.Linear(d, d)})
        self.mlp = nn.ModuleDict(
            {"gate_proj": nn.Linear(d, h), "up_proj": nn.Linear(d, h), "down_proj": nn.Linear(h, d)}
        )

    def forward(self, x):
        x = x + self.self_attn["q_proj"](x)
        m = self.mlp
        return x + m["down_proj"](F.silu(m["gate_proj"](x)) * m["up_proj"](x))


class HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(50, 16)
        self.layers = nn.ModuleList([HFBlock(), HFBlock()])
        self.lm_head = nn.Linear(16, 50, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def randomize_adapters(model, seed=0):
    """Fresh B are zero; give every adapter tensor a nonzero value so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1].startswith("lora_") and not n.endswith("lora_M"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("method", tl.METHODS)
def test_fresh_adapters_leave_output_unchanged_and_freeze_base(method):
    torch.manual_seed(0)
    model, x = HFModel(), torch.randint(0, 50, (2, 5))
    ref = model(x)
    tl.add_adapters(model, method, rank=4, experts=3, dropout=0.0)
    assert torch.equal(model(x), ref)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.rsplit(".", 1)[-1].startswith("lora_") for n in trainable)
    adapted = [n for n, _ in tl.adapter_layers(model)]
    assert len(adapted) == 6 and not any("q_proj" in n or "lm_head" in n for n in adapted)


def test_base_keeps_tensor_names_so_base_checkpoint_loads_unchanged():
    torch.manual_seed(0)
    base = HFModel()
    state = base.state_dict()
    model = tl.add_adapters(HFModel(), "teamlora", rank=2)
    result = model.load_state_dict(state, strict=False)
    assert result.unexpected_keys == []
    assert all(k.rsplit(".", 1)[-1].startswith("lora_") for k in result.missing_keys)
    assert set(state) <= set(model.state_dict())


def test_teamlora_fused_form_equals_expert_loop():
    torch.manual_seed(0)
    layer = tl.TeamLoRALinear(nn.Linear(16, 12), rank=3, experts=4, alpha=32.0, dropout=0.0, router="shapley")
    randomize_adapters(layer)
    x = torch.randn(2, 7, 16)
    fused, loop = layer.delta(x), layer.delta_loop(x)
    assert fused.abs().max() > 0.1
    torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-6)


def test_teamlora_matches_the_equations_written_out():
    """delta = s sum_i w_i B_i z_i with w = k (M phi) / sum(M phi), computed here by hand."""
    torch.manual_seed(1)
    k, r = 3, 2
    layer = tl.TeamLoRALinear(nn.Linear(8, 5, bias=False), rank=r, experts=k, alpha=4.0, dropout=0.0, router="shapley")
    randomize_adapters(layer)
    x = torch.randn(8)
    phi = torch.softmax(layer.router.lora_gate @ x, 0)
    wt = layer.router.lora_M @ phi
    w = k * wt / wt.sum()
    z = layer.lora_A @ x
    expect = sum(w[i] * layer.lora_B[:, i * r : (i + 1) * r] @ z[i * r : (i + 1) * r] for i in range(k)) * (4.0 / r)
    torch.testing.assert_close(layer.delta(x), expect, rtol=1e-5, atol=1e-6)
    assert torch.isclose(layer.router(x).sum(), torch.tensor(float(k)))


def test_shapley_init_is_identity_plus_small_off_diagonal():
    M = tl.Router(16, 4, "shapley").lora_M
    assert torch.equal(M.diagonal(), torch.ones(4))
    off = M - torch.diag(M.diagonal())
    assert off.abs().max() <= 0.1 and off.abs().max() > 0


def test_teamlora_k1_softmax_equals_lora():
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    lora = tl.LoRALinear(base, rank=4, alpha=8.0, dropout=0.0)
    team = tl.TeamLoRALinear(base, rank=4, experts=1, alpha=8.0, dropout=0.0, router="softmax")
    randomize_adapters(lora)
    team.lora_A.data.copy_(lora.lora_A)
    team.lora_B.data.copy_(lora.lora_B)
    x = torch.randn(3, 16)
    torch.testing.assert_close(team(x), lora(x), rtol=1e-6, atol=1e-6)


def test_moelora_and_hydralora_match_their_equations():
    torch.manual_seed(0)
    x = torch.randn(5, 16)
    moe = tl.MoELoRALinear(nn.Linear(16, 12), rank=2, experts=3, alpha=4.0, dropout=0.0, router="softmax")
    hyd = tl.HydraLoRALinear(nn.Linear(16, 12), rank=2, experts=3, alpha=4.0, dropout=0.0, router="softmax")
    for m in (moe, hyd):
        randomize_adapters(m)
    g = torch.softmax(x @ moe.router.lora_gate.t(), -1)
    expect = sum(g[:, i : i + 1] * (x @ moe.lora_A[i].t() @ moe.lora_B[i].t()) for i in range(3)) * 2.0
    torch.testing.assert_close(moe.delta(x), expect, rtol=1e-5, atol=1e-6)
    g = torch.softmax(x @ hyd.router.lora_gate.t(), -1)
    expect = sum(g[:, i : i + 1] * (x @ hyd.lora_A.t() @ hyd.lora_B[i].t()) for i in range(3)) * 2.0
    torch.testing.assert_close(hyd.delta(x), expect, rtol=1e-5, atol=1e-6)


def test_lora_merge_unmerge():
    torch.manual_seed(0)
    model = tl.add_adapters(MetaFFN(), "lora", rank=4, dropout=0.0)
    randomize_adapters(model)
    model.eval()
    x = torch.randn(4, 16)
    w0 = model.w1.weight.clone()
    ref = model(x)
    tl.merge_adapters(model)
    assert not torch.equal(model.w1.weight, w0)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    tl.merge_adapters(model)  # idempotent
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    tl.unmerge_adapters(model)
    torch.testing.assert_close(model.w1.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["moelora", "hydralora", "teamlora"])
def test_merge_refused_for_routed_methods(method):
    model = tl.add_adapters(MetaFFN(), method, rank=2)
    with pytest.raises(ValueError, match="depend on each token"):
        tl.merge_adapters(model)


@pytest.mark.parametrize("method", tl.METHODS)
def test_adapter_state_dict_round_trip(method):
    torch.manual_seed(0)
    base_state = HFModel().state_dict()
    a = HFModel()
    a.load_state_dict(base_state)
    tl.add_adapters(a, method, rank=2, experts=3)
    randomize_adapters(a, seed=3)
    state = tl.adapter_state_dict(a)
    assert state and all(k.rsplit(".", 1)[-1].startswith("lora_") for k in state)
    torch.manual_seed(123)  # a different adapter init in the fresh model
    b = HFModel()
    b.load_state_dict(base_state)
    tl.add_adapters(b, method, rank=2, experts=3)
    tl.load_adapter_state_dict(b, state)
    x = torch.randint(0, 50, (2, 6))
    a.eval(), b.eval()
    assert torch.equal(a(x), b(x))


def test_load_adapter_state_dict_reports_mismatch():
    a = tl.add_adapters(MetaFFN(), "teamlora", rank=2)
    state = tl.adapter_state_dict(a)
    b = tl.add_adapters(MetaFFN(), "lora", rank=2)
    with pytest.raises(ValueError, match="missing .*unexpected"):
        tl.load_adapter_state_dict(b, state)
    c = tl.add_adapters(MetaFFN(), "teamlora", rank=3)
    with pytest.raises(ValueError, match="shape"):
        tl.load_adapter_state_dict(c, state)


def test_no_target_found_names_the_layers():
    with pytest.raises(ValueError, match="gate_proj"):
        tl.add_adapters(HFModel(), "lora", rank=2, targets=("nope",))


@pytest.mark.parametrize("method", ["moelora", "hydralora", "teamlora"])
@pytest.mark.parametrize("router", tl.ROUTERS)
def test_every_trainable_parameter_gets_a_gradient(method, router):
    torch.manual_seed(0)
    model = tl.add_adapters(HFModel(), method, rank=2, experts=3, router=router)
    randomize_adapters(model)
    x = torch.randint(0, 50, (2, 5))
    loss = model(x).pow(2).mean() + 0.1 * tl.adapter_aux_loss(model)
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_aux_loss_zero_when_uniform_and_respects_mask():
    layer = tl.TeamLoRALinear(nn.Linear(4, 4), rank=1, experts=2, alpha=32.0, dropout=0.0, router="shapley")
    model = nn.Sequential(layer)
    layer.last_weights = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])  # shares (.5,.5) and (1,0)
    assert tl.adapter_aux_loss(model, mask=torch.tensor([[True, False]])).item() == pytest.approx(0.0)
    # unmasked: p = (.75, .25) -> 2 * (.25^2 + .25^2) = 0.25
    assert tl.adapter_aux_loss(model).item() == pytest.approx(0.25)


def test_routing_stats_sum_to_token_counts():
    torch.manual_seed(0)
    model = tl.add_adapters(HFModel(), "teamlora", rank=2, experts=4)
    x = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    model(x)
    stats = tl.routing_stats(model, mask)
    assert len(stats) == 6
    for s in stats.values():
        assert s["tokens"] == int(mask.sum())
        assert s["weight_sum"].sum().item() == pytest.approx(s["tokens"], rel=1e-5)
        assert 0 < s["entropy_sum"] / s["tokens"] <= torch.log(torch.tensor(4.0)).item() + 1e-6


def test_router_float32_under_bf16_and_any_batch_shape():
    torch.manual_seed(0)
    base = nn.Linear(16, 8).to(torch.bfloat16)
    layer = tl.TeamLoRALinear(base, rank=2, experts=4, alpha=32.0, dropout=0.0, router="shapley")
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(2, 3, 5, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == (2, 3, 5, 8) and y.dtype == torch.bfloat16
    assert layer.last_weights.dtype == torch.float32


def test_parameter_report_counts():
    model = tl.add_adapters(MetaFFN(16, 24), "teamlora", rank=2, experts=4)
    rep = tl.parameter_report(model)
    # per layer: A (8, d_in) + B (d_out, 8); router gate (4, d_in) + M (4, 4)
    adapter = 8 * (16 + 24) * 2 + 8 * (24 + 16)
    router = (4 * 16 + 16) * 2 + (4 * 24 + 16)
    assert rep["adapter"] == adapter and rep["router"] == router
    assert rep["base"] == 3 * 16 * 24 and rep["trainable"] == adapter + router
    assert rep["trainable_pct"] == pytest.approx(100 * (adapter + router) / (3 * 16 * 24))


def test_file_imports_alone(tmp_path):
    src = Path(tl.__file__).read_text()
    imports = {line.split()[1].split(".")[0] for line in src.splitlines() if line.startswith(("import ", "from "))}
    assert imports <= {"torch", "math"}, imports
    (tmp_path / "teamlora.py").write_text(src)
    code = "import teamlora, torch; m = torch.nn.Sequential(); m.w1 = torch.nn.Linear(4, 4); teamlora.add_adapters(m, 'teamlora', 2)"
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, env={"PYTHONPATH": str(tmp_path)})


# --- The ablation, explained: teamlora and moelora are one function at the same router (issue 10) ---


def paired(router, dropout, seed=7):
    """moelora and teamlora on two copies of one base, each adapted right after the same seed."""
    torch.manual_seed(0)
    base = nn.Sequential(MetaFFN(), MetaFFN()).double()
    models = {}
    for method in ("moelora", "teamlora"):
        models[method] = copy.deepcopy(base)
        torch.manual_seed(seed)
        tl.add_adapters(models[method], method, rank=4, experts=4, dropout=dropout, router=router)  # s = 8: exact
        models[method].double()  # float64 but for the (float32) router: rounding stays far below the tolerance
    return base, models["moelora"], models["teamlora"]


def as_team(name, t):
    """A MoELoRA tensor in TeamLoRA's layout: A (k, r, d_in) -> (k r, d_in), B (k, d_out, r) -> (d_out, k r)."""
    if name.endswith("lora_A"):
        return t.flatten(0, 1)
    if name.endswith("lora_B"):
        return t.permute(1, 0, 2).flatten(1)
    return t  # the router's W_S / W_g and M: the same layout


@pytest.mark.parametrize("router", tl.ROUTERS)
def test_moelora_and_teamlora_start_from_the_same_weights(router):
    _, moe, team = paired(router, dropout=0.05)
    moe_p, team_p = dict(moe.named_parameters()), dict(team.named_parameters())
    assert moe_p.keys() == team_p.keys() and len(moe_p) == 6 * (5 if router == "shapley" else 4)
    for n, p in team_p.items():
        assert torch.equal(p, as_team(n, moe_p[n])), n
    assert all(not p.any() for n, p in team_p.items() if n.endswith("lora_B"))


@pytest.mark.parametrize("router", tl.ROUTERS)
@pytest.mark.parametrize("dropout,mode", [(0.0, "train"), (0.3, "eval"), (0.3, "train")])
def test_moelora_and_teamlora_compute_the_same_function_and_gradients(router, dropout, mode):
    """With B perturbed (fresh B is 0), the same router gives the same outputs and gradients w.r.t.
    the input and every mapped parameter; in training with dropout, the same seed gives one mask."""
    base, moe, team = paired(router, dropout)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in moe.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                team.get_parameter(n).copy_(as_team(n, p))
    x0 = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    probe = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    results = []
    for model in (moe, team):
        model.train(mode == "train")
        x = x0.clone().requires_grad_(True)
        torch.manual_seed(3)  # the dropout masks
        y = model(x)
        ((y * probe).sum() + tl.adapter_aux_loss(model)).backward()
        results.append((y, x.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (y_m, dx_m, grads_m), (y_t, dx_t, grads_t) = results
    assert (y_t - base(x0)).abs().max() > 1e-3  # the adapters do change the function
    torch.testing.assert_close(y_t, y_m, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(dx_t, dx_m, rtol=1e-9, atol=1e-10)
    assert grads_t.keys() == grads_m.keys()
    for n, grad in grads_t.items():
        assert grad.abs().max() > 0, n
        torch.testing.assert_close(grad, as_team(n, grads_m[n]), rtol=1e-9, atol=1e-10, msg=n)


def test_router_default_is_chosen_by_add_adapters_alone():
    """Classes take every argument; add_adapters' signature holds each default once (issue 13)."""
    import inspect

    for cls in [*tl.WRAPPERS.values(), tl.Router]:
        defaults = [p for p in inspect.signature(cls).parameters.values() if p.default is not p.empty]
        assert defaults == [], (cls.__name__, defaults)
    assert tl.METHODS == tuple(tl.WRAPPERS)
    kinds = {m: tl.add_adapters(MetaFFN(), m, rank=2).w1.router.kind for m in ("teamlora", "moelora", "hydralora")}
    assert kinds == {"teamlora": "shapley", "moelora": "softmax", "hydralora": "softmax"}
    assert tl.add_adapters(MetaFFN(), "teamlora", rank=2).w1.dropout.p == 0.05


# --- The shapley normaliser's guard (issue 11.8) and the router's float32 numerics (issue 12) ---


def paper_weights(router, x):
    """w = k (M phi) / sum_j (M phi)_j in float64: the paper's weights, no guard."""
    phi = torch.softmax(x.double() @ router.lora_gate.double().t(), -1)
    mixed = phi @ router.lora_M.double().t()
    return router.k * mixed / mixed.sum(-1, keepdim=True)


@pytest.mark.parametrize("k", [2, 4, 8, 9])
def test_guard_never_binds_at_init_so_weights_are_the_papers(k):
    for seed in range(20):
        torch.manual_seed(seed)
        router = tl.Router(32, k, "shapley")
        x = torch.randn(64, 32) * 3  # sharp and flat softmaxes alike
        w = router(x)
        torch.testing.assert_close(w.double(), paper_weights(router, x), rtol=1e-5, atol=1e-6)
        mixed = torch.softmax(x @ router.lora_gate.t(), -1) @ router.lora_M.t()  # as the unguarded code did
        assert torch.equal(w, k * mixed / mixed.sum(-1, keepdim=True))
        torch.testing.assert_close(w.sum(-1), torch.full((64,), float(k)), rtol=1e-5, atol=1e-5)


def test_guard_bounds_the_weights_where_M_cancels():
    """M's column sums ~1e-7: sum_j w~_j ~1e-7 while the w~_j are ~0.1, so the unguarded weights are
    ~1e6 (a |sum| >= 1e-6 floor gives ~1e5). The guard holds sum_i |w_i| <= k / tau, gradients too."""
    torch.manual_seed(0)
    k = 4
    router = tl.Router(16, k, "shapley")
    with torch.no_grad():
        router.lora_M.copy_(torch.eye(k) - (1 - 1e-7) / k)  # columns sum to 1e-7
        router.lora_gate.mul_(10)  # phi far from uniform, so the w~_j are not ~0
    x = torch.randn(256, 16)
    w = router(x)
    assert torch.isfinite(w).all()
    assert w.abs().sum(-1).max() <= 10 * k * (1 + 1e-5)  # k / tau, tau = 0.1
    assert paper_weights(router, x).abs().max() > 1e5  # what the guard stands between
    (w * torch.randn_like(w)).sum().backward()
    for p in (router.lora_gate, router.lora_M):
        assert torch.isfinite(p.grad).all() and p.grad.abs().max() < 1e4


@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e-3, 1.0, 1e6])
def test_guard_bound_holds_for_any_M_and_input(scale):
    torch.manual_seed(1)
    k = 5
    router = tl.Router(8, k, "shapley")
    with torch.no_grad():
        router.lora_M.copy_(torch.randn(k, k) * scale)
    x = torch.randn(512, 8) * 10
    w = router(x)
    assert torch.isfinite(w).all() and w.abs().sum(-1).max() <= 10 * k * (1 + 1e-5)  # k / tau, tau = 0.1
    w.sum().backward()
    assert torch.isfinite(router.lora_M.grad).all() and torch.isfinite(router.lora_gate.grad).all()


@pytest.mark.parametrize("kind", tl.ROUTERS)
def test_router_under_autocast_rounds_only_the_logits(kind):
    """Under bf16 autocast W_S x runs in x's dtype (no float32 copy of a bf16 x), the rest is the
    float32 router's; a float32 input still gets exactly the float32 router."""
    torch.manual_seed(0)
    router = tl.Router(16, 4, kind)
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w, w32 = router(x), router(x.float())
    assert w.dtype == torch.float32 and torch.equal(w32, router(x.float()))
    assert torch.equal(w, router.weights(F.linear(x, router.lora_gate.bfloat16()).float()))
    torch.testing.assert_close(w, router(x.float()), atol=0.02 * router.total, rtol=0)  # bf16 logits: close


def test_aux_loss_without_routed_layers_is_on_the_models_device():
    """What train.py all-reduces must live on the training device (NCCL refuses CPU tensors, issue 11.1).
    A model on the meta device stands in for a GPU: anything built on the CPU shows."""
    model = tl.add_adapters(MetaFFN().to("meta"), "lora", rank=2)
    zero = tl.adapter_aux_loss(model)
    assert zero.device.type == "meta" and zero.dtype == torch.float32 and zero.shape == ()
    routed = tl.add_adapters(MetaFFN().to("meta"), "teamlora", rank=2)  # no forward yet: no weights
    assert tl.adapter_aux_loss(routed).device.type == "meta"
    assert tl.adapter_aux_loss(tl.add_adapters(MetaFFN(), "lora", rank=2)).item() == 0.0
