"""TeamLoRA and its baselines as drop-in wrappers for nn.Linear (quantized ones too). Imports only torch.

Copy this one file into any project:

    import teamlora
    teamlora.add_adapters(model, "teamlora", rank=8, experts=4)   # FFN layers by default
    ...train; the loss may add  coef * teamlora.adapter_aux_loss(model, mask)
    torch.save(teamlora.adapter_state_dict(model), "adapters.pt")

Every adapter adds a trainable bypass delta(x) to a frozen layer y = W0 x (+ b). Routing is per
token, over the last dimension of inputs of any shape (..., d_in). r is the rank of one expert and
s = alpha / r for every method, so TeamLoRA's scale is alpha / r_B (r_B = r), not alpha / (k r).
drop(x) is one dropout mask, shared by all of a layer's experts. LoRA and TeamLoRA compute A drop(x)
with `dropout_linear`, which keeps x and a bool mask for backward instead of drop(x); the router reads
x itself, so under bf16 autocast a TeamLoRA layer saves for backward what a LoRA layer saves.

    teamlora   z = A drop(x), split into z_1..z_k            A (k r, d_in), expert i reads slice z_i (r)
               delta = s sum_i w_i B_i z_i                   B_i (d_out, r), w = router(x)
    lora       delta = s B A drop(x)                         A (r, d_in), B (d_out, r)
    moelora    delta = s sum_i g_i B_i A_i drop(x)           k independent experts, g = router(x)
    hydralora  delta = s sum_i g_i B_i A drop(x)             one shared A (r, d_in), k heads B_i

Routers (`router=`), computed in float32; under autocast the logits W_S x are one matmul in the
input's dtype (a bf16 model: x and W_S rounded to bf16, the k logits too), then cast to float32:
    softmax    g = softmax(W_g x)                                    sums to 1 per token
    shapley    phi = softmax(W_S x);  w~ = M phi;  t = sum_j w~_j
               w = k w~ / d,   d = sign(t) max(|t|, tau sum_j |w~_j|, 1e-6),   tau = 0.1
               M (k, k) learnable, init I + U(-0.1, 0.1) off the diagonal; sign(0) = 1
The normaliser's guard: wherever the paper's weights k w~ / t have sum_i |w_i| <= k / tau = 10 k, d = t
and w is exactly them, summing to k per token; that holds at init for any input when k <= 9 (there t >
1 - 0.1 (k - 1) and sum_j |w~_j| < 1 + 0.1 (k - 1)). Where the w~_j cancel (M's column sums near 0),
w is the paper's weights scaled down to sum_i |w_i| = 10 k, so for any M and input sum_i |w_i| <= 10 k.
(A bare floor |t| >= eps would let the weights reach ~k / eps.)

TeamLoRA's fused form: w_i is one scalar per token, so sum_i w_i B_i z_i = B_cat ((E w) * z), with
B_cat = [B_1 ... B_k] (d_out, k r) stored as `lora_B` and E = I_k (x) 1_r (k r, k) repeating each
weight over its expert's r rank coordinates (the buffer `expand` holds s E, so one (k r, k) product
applies the weights and s). The weights scale the k r rank coordinates, never the d_out outputs: the
cost of one LoRA of rank k r (its two matrix products) plus the router. MoELoRA keeps the published
loop over experts (k full (tokens, d_out) outputs), the baseline the paper timed; HydraLoRA loops
over its heads.

Collaboration and competition (the paper's ablation, explained). Stacking MoELoRA's A_i (k, r, d_in)
gives TeamLoRA's split A (k r, d_in), and B_cat = [B_1 ... B_k]: with the same router, `moelora` and
`teamlora` compute the same delta(x), and with the same seed they start from the same numbers (both
draw the router, then A_1..A_k one after another; B = 0). The collaboration module (the shared,
split A) changes the cost, not the function: teamlora + softmax is MoELoRA computed fast, moelora +
shapley is TeamLoRA computed slowly. The competition router (shapley) is what can change quality.
The paper's own ablation (r = 32, CME average) agrees: collaboration only (teamlora + softmax) 59.77
vs MoELoRA 59.69; competition only (moelora + shapley) 60.24 vs both (teamlora) 60.29.
tests/test_teamlora.py checks the equivalence: initial weights, outputs and gradients.

Load balance (optional): with p_i the mean over real tokens of expert i's share (g_i, or w_i / k),
    L_bal = k sum_i (p_i - 1/k)^2,   averaged over adapted layers by `adapter_aux_loss`.

Public API: add_adapters (its signature holds every default), mark_only_adapters_trainable,
adapter_state_dict, load_adapter_state_dict, adapter_aux_loss, merge_adapters, unmerge_adapters,
routing_stats, routing_entropy, parameter_report, adapter_layers; for analysis, set_knockout (knock_out) and
interaction_summary. Base tensors keep their names (`...w1.weight`);
every adapter tensor's name starts with `lora_`, so base checkpoints load unchanged after injection.

Quantized bases (QLoRA-style): any subclass of nn.Linear is adapted, e.g. a model loaded with
transformers' BitsAndBytesConfig(load_in_4bit=True). Such a layer computes W0 x with its own forward
(a 4-bit one dequantizes in its compute dtype), the adapters add delta(x) in float32, and its
state-dict entries keep their names (`w1.weight`, `w1.weight.absmax`, ...). Only merging needs a
plain nn.Linear: merge_adapters refuses a quantized base.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

ROUTERS = ("softmax", "shapley")
FFN_TARGETS = ("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj")  # Meta and Hugging Face names
PREFIX = "lora_"


class Router(nn.Module):
    """Per-token expert weights in float32: `softmax` (sum 1) or `shapley` (interaction matrix, sum k).
    Outside autocast exactly float32; under it W_S x runs in x's dtype (see the module docstring)."""

    tau = 0.1  # the normaliser guard: sum_i |w_i| <= k / tau

    def __init__(self, d_in, k, kind):
        super().__init__()
        if kind not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {kind!r}")
        self.k, self.kind = k, kind
        self.total = 1.0 if kind == "softmax" else float(k)  # what the weights of one token sum to
        self.lora_gate = nn.Parameter(torch.empty(k, d_in))  # W_g / W_S: a bias-free linear map
        nn.init.kaiming_uniform_(self.lora_gate, a=math.sqrt(5))
        if kind == "shapley":
            off = torch.empty(k, k).uniform_(-0.1, 0.1).fill_diagonal_(0.0)
            self.lora_M = nn.Parameter(torch.eye(k) + off)

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):
            # W_S x in x's own dtype (bf16 in a bf16 model): the matmul saves x itself for backward,
            # the tensor the layer's A product saved already (dropout_linear), where x.float() would
            # save a float32 copy (4 bytes per input value per routed layer). Only the k logits are
            # rounded to bf16; softmax, M and the normaliser stay float32. The autocast context is
            # entered only when autocast is on, since entering it is dear at decode.
            with torch.autocast(x.device.type, enabled=False):
                return self.weights(F.linear(x, self.lora_gate.to(x.dtype)).float())
        # .float() returns float32 tensors themselves: a cast only for bf16 inputs or adapters.
        return self.weights(F.linear(x.float(), self.lora_gate.float()))

    def weights(self, logits):
        """The expert weights (..., k) of float32 logits W_S x (..., k)."""
        phi = torch.softmax(logits, dim=-1)  # (..., k)
        if self.kind == "softmax":
            return phi
        mixed = F.linear(phi, self.lora_M.float())  # w~ = M phi: w~_i = sum_j M_ij phi_j (..., k)
        t = mixed.sum(-1, keepdim=True)
        # The guard (see the docstring): |d| >= tau sum_j |w~_j| bounds sum_i |w_i| by k / tau.
        # (abs().sum, not linalg.vector_norm: on CPU that is ~18x slower on (2048, k).)
        d = torch.maximum(t.abs(), self.tau * mixed.abs().sum(-1, keepdim=True))
        return self.k * mixed / d.clamp_min(1e-6).copysign(t)


class _DropoutLinear(torch.autograd.Function):
    """A drop(x) for backward from x and the dropout mask (bool), not from the dropped copy of x."""

    @staticmethod
    def forward(ctx, x, A, p):
        mask = torch.native_dropout(x, p, True)[1]  # the mask nn.Dropout draws, from the same RNG
        z = F.linear(x * _noise(mask, p, x.dtype), A)  # under autocast in its dtype, as outside a Function
        ctx.p, ctx.dtype = p, z.dtype
        ctx.save_for_backward(x, mask, A)
        return z

    @staticmethod
    def backward(ctx, grad):
        # autograd's own chain in the forward's dtypes: drop(x) = x * noise -> cast -> linear with A cast
        x, mask, A = ctx.saved_tensors
        noise = _noise(mask, ctx.p, x.dtype)
        dx = dA = None
        if ctx.needs_input_grad[0]:
            dx = (grad @ A.to(ctx.dtype)).to(x.dtype) * noise
        if ctx.needs_input_grad[1]:
            dropped = (x * noise).to(ctx.dtype)  # drop(x) again, bit for bit
            dA = (grad.reshape(-1, grad.shape[-1]).T @ dropped.reshape(-1, x.shape[-1])).to(A.dtype)  # (r, d_in)
        return dx, dA, None


def _noise(mask, p, dtype):
    """mask / (1 - p) in x's dtype, as nn.Dropout scales its mask on a CPU (bf16: 1 / (1 - p) rounded)."""
    return mask.to(dtype) * (1.0 / (1.0 - p))


def dropout_linear(x, A, dropout, training):
    """F.linear(dropout(x), A), the first product of an adapter, saving x and a bool mask for
    backward instead of drop(x) (2-4 bytes per input value): the router reads x itself, so a
    routed layer keeps one copy of its input, as a LoRA layer does (and w1 and w3 share theirs)."""
    p = dropout.p if isinstance(dropout, nn.Dropout) else 0.0
    if not (training and 0.0 < p < 1.0 and torch.is_grad_enabled()):
        return F.linear(dropout(x), A)
    return _DropoutLinear.apply(x, A, p)


class AdapterLinear(nn.Linear):
    """Base of the wrappers: holds the frozen `weight`/`bias` of the linear layer it replaces, under
    the same names, and adds delta(x). Subclasses set `lora_*` parameters and `delta`.

    The layer may be any nn.Linear subclass (bitsandbytes' 4-bit Linear4bit and 8-bit Linear8bitLt, a
    layer with its own forward). Such a layer is kept as `self.base` and computes y with its own
    forward, on the same weight and bias objects; it stays outside the module tree, so its tensors
    keep their names (`w1.weight`, not `w1.base.weight`), and its own code writes and reads its extra
    state-dict entries (bitsandbytes: `w1.weight.absmax`, `w1.weight.quant_map`, ..., `w1.SCB`).
    A plain nn.Linear needs none of this: base is None and y = F.linear(x, weight, bias)."""

    routed = False

    def __init__(self, base: nn.Linear, rank, alpha, dropout):
        nn.Module.__init__(self)  # reuse base's tensors: no new allocation, same state-dict names
        # From the layer, not weight.shape: a packed 4-bit weight is (d_out d_in / 2, 1) uint8.
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        object.__setattr__(self, "base", None if type(base) is nn.Linear else base)  # an attribute, not a submodule
        self.rank, self.scale = rank, alpha / rank  # s = alpha / r, r the rank of one expert
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def _init_A(self, k, r):
        """k matrices A_i (r, d_in), (k, r, d_in), each kaiming-uniform as nn.Linear inits its weight
        (bound 1 / sqrt(d_in)), drawn one after another: MoELoRA's A_i stacked are TeamLoRA's A.
        Adapters are float32 on the layer's device, whatever the base's dtype (bf16, packed uint8)."""
        A = torch.empty(k, r, self.in_features, device=self.weight.device)
        for a in A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        return A

    def forward(self, x):
        # A base with its own forward computes in its own dtype (bitsandbytes 4-bit: its compute_dtype)
        # and returns y in x's dtype; delta below takes x as it came, like the base.
        y = F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)
        if self.merged:
            return y
        # Adapters keep their own dtype (float32) when the base runs in bf16. Under autocast the
        # matmuls run in its dtype anyway, so the input is left as it is (no float32 copy).
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(self.lora_A.dtype)
        return y + self.delta(x).to(y.dtype)

    def cannot_merge(self):
        """Why W0 + s B A cannot stand for this layer (merge raises it), or None."""
        if self.base is not None:
            return (f"its base is a {type(self.base).__name__}, not a plain nn.Linear: its weight is not the "
                    "matrix W0 its forward multiplies by (a quantized weight is packed). Load the adapters on "
                    "the unquantized base to merge them")
        return None

    # A base other than nn.Linear stays itself: what nn.Module does for a submodule, done by hand.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)  # weight, bias, the lora_ tensors
        if self.base is not None:  # then the base's entries as it writes them (bnb: packed weight + quant state)
            self.base._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        n = len(unexpected)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        if self.base is not None:  # what nn.Module did not know (bnb 8-bit: SCB), through the base's own loader
            own = unexpected[n:] + [prefix + "weight", prefix + "bias"]
            theirs = {k: v for k, v in state_dict.items() if k in own}
            del unexpected[n:]
            self.base._load_from_state_dict(theirs, prefix, local_metadata, strict, [], unexpected, errors)
            self.weight, self.bias = self.base.weight, self.base.bias  # as it loaded them (assign=True replaces)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # .to(), .float(), ...: may replace weight and bias by new tensors
        if self.base is not None:
            self.base.weight, self.base.bias = self.weight, self.bias
        return self

    def train(self, mode=True):
        if self.base is not None:
            self.base.train(mode)  # bitsandbytes' forwards read their own `training`
        return super().train(mode)

    def extra_repr(self):
        base = "" if self.base is None else f", base={type(self.base).__name__}"
        return f"{self.in_features}, {self.out_features}, rank={self.rank}, scale={self.scale:g}{base}"


class RoutedLinear(AdapterLinear):
    """A wrapper with a router. Keeps the last forward's weights for the balance term and statistics."""

    routed = True

    def __init__(self, base, rank, experts, alpha, dropout, router):
        super().__init__(base, rank, alpha, dropout)
        self.k = experts
        self.router = Router(self.in_features, experts, router).to(self.weight.device)
        self.last_weights = None  # (..., k) float32, with grad while training
        self.knockout = None  # a knock_out variant (set_knockout), or None: the router's weights untouched

    def route(self, x):
        w = self.router(x)
        if self.knockout is not None:  # an analysis only; when off, w is the router's tensor itself
            w = knock_out(w, self.knockout, self.router.total)
        self.last_weights = w
        return w

    def cannot_merge(self):
        return ("its expert weights depend on each token (w(x)), so sum_i w_i(x) B_i A_i is no fixed matrix. "
                "Only LoRA merges; keep routed adapters unmerged")

    def merge(self, sign=1.0):
        raise ValueError(f"{type(self).__name__} cannot be merged into W0: {self.cannot_merge()}")


KNOCKOUTS = ("top1", "drop", "alone")


def knock_out(w, variant, total):
    """Expert weights w (..., k) under a knock-out (the paper's redundancy analysis), T = total, the
    router's sum per token (softmax 1, shapley k); variant (kind, i), kind in KNOCKOUTS:
        ("top1", None)  each token keeps only its largest weight, raised to the total:  w'_j = T [j = argmax w]
        ("drop", i)     expert i zeroed, the others rescaled to the total:  w'_j = T w_j [j != i] / d
        ("alone", i)    one fixed expert with the whole total:  w'_j = T [j = i]
    d = sum_{j != i} w_j, guarded as the shapley normaliser is, d = sign(t) max(|t|, tau sum_{j != i}
    |w_j|, 1e-6) with t that sum: softmax weights are positive, so there d = t unless expert i held all."""
    kind, i = variant
    if kind == "top1":
        return torch.zeros_like(w).scatter_(-1, w.argmax(-1, keepdim=True), total)
    if kind == "alone":
        return torch.zeros_like(w).index_fill_(-1, torch.tensor([i], device=w.device), total)
    if kind != "drop":
        raise ValueError(f"knock-out kind must be one of {KNOCKOUTS}, got {kind!r}")
    kept = w.index_fill(-1, torch.tensor([i], device=w.device), 0.0)  # (..., k), w_i = 0
    t = kept.sum(-1, keepdim=True)
    d = torch.maximum(t.abs(), Router.tau * kept.abs().sum(-1, keepdim=True))
    return total * kept / d.clamp_min(1e-6).copysign(t)


def set_knockout(model, variant=None):
    """Route every routed layer under `variant` (knock_out's (kind, i)); None restores the routers'
    own weights. Returns k. The layers' forward is otherwise unchanged, so any evaluation runs as is."""
    routed = [layer for _, layer in adapter_layers(model) if layer.routed]
    if not routed:
        raise ValueError("the model has no routed adapter layer (LoRA and full fine-tuning have no experts)")
    k = routed[0].k
    if variant is not None:
        kind, i = variant
        if kind not in KNOCKOUTS or (kind == "top1") != (i is None) or (i is not None and not 0 <= i < k):
            raise ValueError(f"knock-out variant must be ('top1', None) or ('drop'|'alone', 0..{k - 1}), "
                             f"got {variant!r}")
    for layer in routed:
        layer.knockout = variant
    return k


class TeamLoRALinear(RoutedLinear):
    """Shared A of rank k r split into k slices, expert B_i reads slice i; fused in the rank space."""

    def __init__(self, base, rank, experts, alpha, dropout, router):
        super().__init__(base, rank, experts, alpha, dropout, router)
        self.lora_A = nn.Parameter(self._init_A(experts, rank).flatten(0, 1))  # [A_1; ...; A_k] (k r, d_in)
        # B_cat = [B_1 ... B_k]: expert i owns columns i r .. (i+1) r - 1.
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, experts * rank, device=self.weight.device))
        # s E = s (I_k (x) 1_r), (k r, k): (s E w)_{i r + j} = s w_i. A constant, so not in the state dict.
        E = torch.eye(experts, device=self.weight.device).repeat_interleave(rank, dim=0)
        self.register_buffer("expand", self.scale * E, persistent=False)

    def delta(self, x):
        w = self.route(x)  # (..., k) float32
        z = dropout_linear(x, self.lora_A, self.dropout, self.training)  # A drop(x) (..., k r)
        return F.linear(z * F.linear(w.to(z.dtype), self.expand), self.lora_B)  # z_i *= s w_i: rank space

    def delta_loop(self, x):
        """The same delta computed expert by expert (the definition; used to test the fused form)."""
        w = self.route(x).to(x.dtype)
        z = F.linear(self.dropout(x), self.lora_A).split(self.rank, dim=-1)
        B = self.lora_B.split(self.rank, dim=-1)
        return sum(w[..., i : i + 1] * F.linear(z[i], B[i]) for i in range(self.k)) * self.scale


class LoRALinear(AdapterLinear):
    """delta = s B A drop(x); the only method that merges into W0."""

    def __init__(self, base, rank, alpha, dropout):
        super().__init__(base, rank, alpha, dropout)
        self.lora_A = nn.Parameter(self._init_A(1, rank)[0])  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=self.weight.device))  # (d_out, r)

    def delta(self, x):
        z = dropout_linear(x, self.lora_A, self.dropout, self.training)  # A drop(x) (..., r)
        return F.linear(z * self.scale, self.lora_B)  # s applied on r, not d_out

    @torch.no_grad()
    def merge(self, sign=1.0):
        if self.merged == (sign > 0):
            return
        if self.cannot_merge():
            raise ValueError(f"{type(self).__name__} cannot be merged into W0: {self.cannot_merge()}")
        dW = (self.lora_B.float() @ self.lora_A.float()) * self.scale  # (d_out, d_in)
        self.weight.add_((sign * dW).to(self.weight.dtype))
        self.merged = sign > 0


class MoELoRALinear(RoutedLinear):
    """k independent LoRA experts, weighted in the output space by a loop (the published baseline)."""

    def __init__(self, base, rank, experts, alpha, dropout, router):
        super().__init__(base, rank, experts, alpha, dropout, router)
        self.lora_A = nn.Parameter(self._init_A(experts, rank))  # (k, r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(experts, self.out_features, rank, device=self.weight.device))

    def delta(self, x):
        g = (self.route(x) * self.scale).to(x.dtype)  # (..., k), s folded in
        x = self.dropout(x)  # one mask for all experts, as TeamLoRA's (see the docstring's ablation)
        out = 0
        for i in range(self.k):  # each expert: a full (..., d_out) output, then weighted
            out = out + g[..., i : i + 1] * F.linear(F.linear(x, self.lora_A[i]), self.lora_B[i])
        return out


class HydraLoRALinear(RoutedLinear):
    """One shared A of rank r, k heads B_i, each head weighted in the output space."""

    def __init__(self, base, rank, experts, alpha, dropout, router):
        super().__init__(base, rank, experts, alpha, dropout, router)
        self.lora_A = nn.Parameter(self._init_A(1, rank)[0])  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(experts, self.out_features, rank, device=self.weight.device))

    def delta(self, x):
        g = (self.route(x) * self.scale).to(x.dtype)  # (..., k), s folded in
        z = F.linear(self.dropout(x), self.lora_A)  # (..., r), shared by every head
        out = 0
        for i in range(self.k):
            out = out + g[..., i : i + 1] * F.linear(z, self.lora_B[i])
        return out


WRAPPERS = {"lora": LoRALinear, "moelora": MoELoRALinear, "hydralora": HydraLoRALinear, "teamlora": TeamLoRALinear}
METHODS = tuple(WRAPPERS)


def add_adapters(model, method, rank, experts=4, alpha=32.0, dropout=0.05, targets=FFN_TARGETS, router=None):
    """Replace every nn.Linear (or subclass: bitsandbytes' 4-/8-bit layers) whose module name ends in
    one of `targets` by `method`'s wrapper, then freeze everything but the adapters. `rank` is the
    per-expert rank r, `experts` is k; `router=None` picks the method's own (teamlora: shapley,
    others: softmax). Returns the model.
    These keyword arguments are the whole adapter config: `add_adapters(model, **config)` rebuilds it."""
    if method not in WRAPPERS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if rank < 1 or experts < 1:
        raise ValueError(f"rank and experts must be >= 1, got rank={rank}, experts={experts}")
    kwargs = dict(alpha=alpha, dropout=dropout)
    if method != "lora":
        kwargs.update(experts=experts, router=router or ("shapley" if method == "teamlora" else "softmax"))
    elif router not in (None, "softmax"):
        raise ValueError(f"method 'lora' has no router, got router={router!r}")
    targets = set(targets)
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not isinstance(m, AdapterLinear) and n.rsplit(".", 1)[-1] in targets]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no nn.Linear named {sorted(targets)} in the model; its linear layers are named {names}")
    for name, linear in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, WRAPPERS[method](linear, rank, **kwargs))
    mark_only_adapters_trainable(model)
    return model


def adapter_layers(model):
    """(name, wrapper) for every adapted layer."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLinear)]


def mark_only_adapters_trainable(model):
    for n, p in model.named_parameters():
        p.requires_grad_(n.rsplit(".", 1)[-1].startswith(PREFIX))


def adapter_state_dict(model):
    """Adapter tensors only (router included), keyed by their full names."""
    return {n: t.detach().clone() for n, t in model.state_dict().items() if n.rsplit(".", 1)[-1].startswith(PREFIX)}


def load_adapter_state_dict(model, state):
    """Load adapter tensors; a missing or unexpected adapter key, or a wrong shape, is an error."""
    own = adapter_state_dict(model)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if missing or unexpected:
        raise ValueError(
            "adapter state does not match the model (same method, rank, experts, router and targets?): "
            f"missing {len(missing)} {missing[:5]}, unexpected {len(unexpected)} {unexpected[:5]}"
        )
    for n, t in state.items():
        if own[n].shape != t.shape:
            raise ValueError(f"adapter tensor {n}: checkpoint shape {tuple(t.shape)}, model {tuple(own[n].shape)}")
    model.load_state_dict(state, strict=False)


def _shares(layer, mask):
    """(k,) expert i's shares summed over real tokens (every token when mask is None), and their
    count (a 0-dim tensor). A mask-weighted sum, not p[mask]: boolean indexing has a data-dependent
    shape, a device-to-host sync per routed layer on a GPU; this stays on the device."""
    p = (layer.last_weights / layer.router.total).reshape(-1, layer.k)  # (N, k)
    if mask is None:
        return p.sum(0), torch.tensor(float(p.shape[0]), device=p.device)
    m = mask.reshape(-1, 1).to(device=p.device, dtype=p.dtype)  # (N, 1): 1 on real tokens
    return (p * m).sum(0), m.sum()


def adapter_aux_loss(model, mask=None):
    """L_bal = k sum_i (p_i - 1/k)^2 of the last forward, averaged over routed layers; 0 (float32, on
    the model's device, so collectives can reduce it) if none. mask: (...) of the input's leading
    shape, true on real (non-padding) tokens. No host sync: it can run every micro-step."""
    losses = []
    for _, layer in adapter_layers(model):
        if layer.routed and layer.last_weights is not None:
            total, n = _shares(layer, mask)
            p = total / n.clamp_min(1.0)  # (k,) mean share; 0 without real tokens
            losses.append(layer.k * ((p - 1.0 / layer.k) ** 2).sum())
    if losses:
        return torch.stack(losses).mean()
    param = next(model.parameters(), None)
    return torch.zeros((), dtype=torch.float32, device=param.device if param is not None else None)


def routing_entropy(p):
    """Entropy (nats) over the last dimension of expert shares p (..., k). Shapley weights can dip
    below 0, so the shares are clamped at 0 and renormalised first; log k when they are even."""
    q = p.clamp(min=0)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-12)
    return -(q * q.clamp(min=1e-12).log()).sum(-1)


@torch.no_grad()
def routing_stats(model, mask=None):
    """Per routed layer, from the last forward: {"weight_sum": (k,) sum over tokens of each expert's
    share, "entropy_sum": sum over tokens of the routing entropy (nats, `routing_entropy`), "top_half":
    tokens whose largest share exceeds 1/2, "tokens": count}. Sums, so callers can accumulate over
    batches; mean share = weight_sum / tokens. Computed on the device with masked sums, then copied
    to the host once for all layers."""
    names, rows = [], []
    for name, layer in adapter_layers(model):
        if layer.routed and layer.last_weights is not None:
            weight_sum, n = _shares(layer, mask)
            p = (layer.last_weights / layer.router.total).reshape(-1, layer.k).float()  # (N, k)
            m = 1.0 if mask is None else mask.reshape(-1).to(device=p.device, dtype=p.dtype)  # (N,)
            rows.append(torch.cat([weight_sum.float(), (routing_entropy(p) * m).sum()[None],
                                   ((p.amax(-1) > 0.5).float() * m).sum()[None], n.float()[None]]))
            names.append(name)
    if not rows:
        return {}
    table = torch.stack(rows).double().cpu()  # (layers, k + 3): the one transfer
    return {name: {"weight_sum": row[:-3].float(), "entropy_sum": row[-3].item(), "top_half": int(row[-2]),
                   "tokens": int(row[-1])} for name, row in zip(names, table)}


@torch.no_grad()
def interaction_summary(model):
    """The shapley routers' interaction matrices M (k, k), per layer ("layers") and their mean over
    layers ("mean"), each with "M" and its distance from the identity: "identity_distance" = ||M - I||_F,
    "off_diagonal" = the Frobenius norm of M's off-diagonal part, "diagonal_drift" = ||diag(M) - 1||.
    Reading: w~_i = sum_j M_ij phi_j, so M_ij > 0 (i != j) lets expert j's Shapley value raise expert
    i's weight and M_ij < 0 lowers it. At init the diagonal is exactly 1 and the off-diagonal is
    U(-0.1, 0.1), of expected norm sqrt(k (k - 1) / 300) ("init_off_diagonal"). {} without shapley routers."""
    mats = {n: layer.router.lora_M.detach().float().cpu() for n, layer in adapter_layers(model)
            if layer.routed and layer.router.kind == "shapley"}
    if not mats:
        return {}

    def distances(M):
        eye = torch.eye(M.shape[0])
        return {"M": M.tolist(), "identity_distance": (M - eye).norm().item(),
                "off_diagonal": (M * (1 - eye)).norm().item(), "diagonal_drift": (M.diagonal() - 1).norm().item()}

    k = next(iter(mats.values())).shape[0]
    mean = torch.stack(list(mats.values())).mean(0)  # (k, k)
    return {"layers": {n: distances(M) for n, M in mats.items()}, "mean": distances(mean),
            "init_off_diagonal": math.sqrt(k * (k - 1) / 300)}


def merge_adapters(model):
    """Fold LoRA into W0 for inference. Raises, before any layer changes, where one cannot merge: a
    routed method, or a base other than a plain nn.Linear (a quantized one)."""
    layers = adapter_layers(model)
    for name, layer in layers:
        if layer.cannot_merge():
            raise ValueError(f"{name} ({type(layer).__name__}) cannot be merged into W0: {layer.cannot_merge()}")
    for _, layer in layers:
        layer.merge(+1.0)


def unmerge_adapters(model):
    for _, layer in adapter_layers(model):
        if layer.merged:
            layer.merge(-1.0)


def parameter_report(model):
    """Parameter counts: total (base + adapters), base, adapter (router excluded), router,
    trainable, and the trainable share of the base model in percent."""
    count = {"adapter": 0, "router": 0, "total": 0, "trainable": 0}
    for n, p in model.named_parameters():
        owner, _, leaf = n.rpartition(".")
        layer, numel = model.get_submodule(owner), p.numel()
        if leaf == "weight" and isinstance(layer, nn.Linear):  # a packed (quantized) weight: the matrix it stands for
            numel = layer.in_features * layer.out_features
        count["total"] += numel
        count["trainable"] += numel if p.requires_grad else 0
        if leaf.startswith(PREFIX):
            count["router" if ".router." in f".{n}" else "adapter"] += numel
    count["base"] = count["total"] - count["adapter"] - count["router"]
    count["trainable_pct"] = 100.0 * count["trainable"] / max(count["base"], 1)
    return count
