"""Every shipped spec parses, builds and runs; and its mixer equals an independent implementation
of the published model's recurrence, written here in plain torch from the same weights.

The implementations below do not use lcsm's stages or kernels. Where the published model has a
parallel form (linear attention, TNL, RetNet, cosFormer, SSD, S4D's convolution kernel, softmax
attention) it is used, so the check is also a check of the recurrence against its closed form.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lcsm.nn.model import Model
from lcsm.config.spec import load_model_spec
from lcsm.config.paths import zoo_names, zoo_paths

B, T = 2, 13
LAYER = 1  # not the first layer: TNL's decay and HGRN2's lower bound depend on depth


# --------------------------------------------------------------------------- helpers


def heads(x, H):
    return x.unflatten(-1, (H, -1))


def rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def causal_conv(x, weight, bias=None):
    """Depthwise causal conv written out: out_t = sum_j w_j x_{t-size+1+j}; weight [C,1,size]."""
    size = weight.shape[-1]
    xp = F.pad(x, (0, 0, size - 1, 0))
    out = sum(weight[:, 0, j] * xp[:, j : j + x.shape[1]] for j in range(size))
    return out if bias is None else out + bias


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def lin(x, p, name, bias=True):
    out = x @ p[name + ".weight"].T
    if bias and name + ".bias" in p:
        out = out + p[name + ".bias"]
    return out


def decay_mask(log_lambda, T):
    """D[h, t, s] = λ_h^(t-s) for s <= t, else 0."""
    t = torch.arange(T, dtype=torch.float64)
    diff = (t[:, None] - t[None, :]).clamp(min=0)
    return torch.exp(log_lambda[:, None, None] * diff) * causal(T)


# --------------------------------------------------------------------------- published models


def linear_attention(m, p, x):
    H = m.H
    q = heads(1 + F.elu(lin(x, p, "shrink.proj.proj")), H)
    k = heads(1 + F.elu(lin(x, p, "expand.proj.proj")), H)
    v = heads(lin(x, p, "input.proj.proj"), H)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * causal(x.shape[1])
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    o = rms(o, p["out_norm.weight"], m.out_norm.eps)
    return lin(o.flatten(-2), p, "o_proj")


def tnl(m, p, x, n_layers):
    H = m.H
    q = heads(F.silu(lin(x, p, "shrink.proj.proj")), H)
    k = heads(F.silu(lin(x, p, "expand.proj.proj")), H)
    v = heads(F.silu(lin(x, p, "input.proj.proj")), H)
    slope = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
    log_lambda = -slope * (1 - LAYER / (n_layers - 1) + 1e-5)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * decay_mask(log_lambda, x.shape[1])
    o = torch.einsum("bhts,bshv->bthv", scores, v).flatten(-2)
    o = rms(o, p["out_norm.weight"], m.out_norm.eps)
    gate = torch.sigmoid(lin(lin(x, p, "gate_proj.0"), p, "gate_proj.1"))
    return lin(o * gate, p, "o_proj")


def retnet(m, p, x):
    H = m.H
    q = heads(lin(x, p, "shrink.proj.proj"), H)
    k = heads(lin(x, p, "expand.proj.proj"), H) * m.K**-0.5
    v = heads(lin(x, p, "input.proj.proj"), H)
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(H, dtype=torch.float64))
    scores = torch.einsum("bthk,bshk->bhts", q, k) * decay_mask(torch.log(gamma), x.shape[1])
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    o = layer_norm(o, p["out_norm.weight"], p["out_norm.bias"], m.out_norm.eps).flatten(-2)
    return lin(o * F.silu(lin(x, p, "gate_proj")), p, "o_proj")


def cosformer(m, p, x, max_len=2048):
    H, T = m.H, x.shape[1]
    q = heads(F.relu(lin(x, p, "shrink.proj.proj")), H)
    k = heads(F.relu(lin(x, p, "expand.proj.proj")), H)
    v = heads(lin(x, p, "input.proj.proj"), H)
    t = torch.arange(T, dtype=torch.float64)
    reweight = torch.cos(math.pi / (2 * max_len) * (t[:, None] - t[None, :])) * causal(T)
    scores = torch.einsum("bthk,bshk->bhts", q, k) * reweight
    o = torch.einsum("bhts,bshv->bthv", scores, v)
    o = rms(o, p["out_norm.weight"], m.out_norm.eps)
    return lin(o.flatten(-2), p, "o_proj")


def gla(m, p, x):
    H, K = m.H, m.K
    q = heads(lin(x, p, "shrink.proj.proj"), H) * K**-0.5
    k = heads(lin(x, p, "expand.proj.proj"), H)
    v = heads(lin(x, p, "input.proj.proj"), H)
    alpha_log = heads(F.logsigmoid(lin(lin(x, p, "oscillation.gate.proj.0"), p, "oscillation.gate.proj.1")) / 16, H)
    S = torch.zeros(x.shape[0], H, K, v.shape[-1], dtype=x.dtype)
    outs = []
    for t in range(x.shape[1]):
        S = torch.exp(alpha_log[:, t])[..., None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = rms(torch.stack(outs, 1), p["out_norm.weight"], m.out_norm.eps).flatten(-2)
    return lin(o * F.silu(lin(x, p, "gate_proj")), p, "o_proj")


def hgrn2(m, p, x, gamma):
    H, K = m.H, m.K
    soft = torch.softmax(gamma, dim=0)
    beta = (torch.cumsum(soft, dim=0) - soft[0])[LAYER]  # lower bound of this layer
    f = beta + (1 - beta) * torch.sigmoid(lin(x, p, "oscillation.gate.proj"))
    f = heads(f, H)
    key = 1 - f
    i = heads(lin(x, p, "input.proj.proj"), H)  # a plain linear input (fla's HGRN2Attention: i = i_proj(x))
    q = heads(F.silu(lin(x, p, "shrink.proj.proj")), H)
    h = torch.zeros(x.shape[0], H, K, i.shape[-1], dtype=x.dtype)
    outs = []
    for t in range(x.shape[1]):
        h = f[:, t, :, :, None] * h + key[:, t, :, :, None] * i[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], h))
    o = rms(torch.stack(outs, 1).flatten(-2), p["out_norm.weight"], m.out_norm.eps)
    return lin(o, p, "o_proj")


def mamba(m, p, x):
    """selective_scan_ref of the Mamba repository, layout [b, d, l] / [d, n]."""
    u = F.silu(causal_conv(lin(x, p, "input.proj.proj"), p["input.proj.conv.conv.weight"]))  # [B,T,D]
    delta = F.softplus(lin(lin(x, p, "oscillation.delta.proj.0"), p, "oscillation.delta.proj.1"))
    A = -torch.exp(p["oscillation.A_log"][0]).T  # [D, N]
    Bm, Cm = lin(x, p, "expand.proj.proj"), lin(x, p, "shrink.proj.proj")  # [B,T,N]
    u_, delta_ = u.transpose(1, 2), delta.transpose(1, 2)  # [B,D,L]
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta_, A))
    deltaB_u = torch.einsum("bdl,bln,bdl->bdln", delta_, Bm, u_)
    state = torch.zeros(x.shape[0], A.shape[0], A.shape[1], dtype=x.dtype)
    ys = []
    for t in range(x.shape[1]):
        state = deltaA[:, :, t] * state + deltaB_u[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", state, Cm[:, t]))
    y = torch.stack(ys, dim=1) + u * p["D"][0]
    return lin(y * F.silu(lin(x, p, "gate_proj")), p, "o_proj")


def mamba2(m, p, x):
    """ssd_minimal's quadratic form: y = (L ⊙ C Bᵀ) (Δ x) with L_ts = exp(Σ_{s<r<=t} Δ_r a)."""
    H = m.H
    xs = heads(F.silu(causal_conv(lin(x, p, "input.proj.proj"), p["input.proj.conv.conv.weight"])), H)
    Bm = heads(F.silu(causal_conv(lin(x, p, "expand.proj.proj"), p["expand.proj.conv.conv.weight"])), H)
    Cm = heads(F.silu(causal_conv(lin(x, p, "shrink.proj.proj"), p["shrink.proj.conv.conv.weight"])), H)
    dt = F.softplus(lin(x, p, "oscillation.gate.proj"))  # [B,T,H]
    a = -dt * torch.exp(p["oscillation.gate.A_log"])  # log decay per step
    cs = torch.cumsum(a, dim=1)
    Lmat = torch.exp(cs[:, :, None, :] - cs[:, None, :, :]) * causal(x.shape[1])[None, :, :, None]  # [B,t,s,H]
    scores = torch.einsum("bthn,bshn->btsh", Cm, Bm) * Lmat
    y = torch.einsum("btsh,bshp->bthp", scores, xs * dt[..., None])
    y = y + xs * p["D"]
    z = heads(F.silu(lin(x, p, "gate_proj")), H)
    y = rms((y * z).flatten(-2), p["out_norm.weight"], m.out_norm.eps)
    return lin(y, p, "o_proj")


def s4d(m, p, x):
    """The convolution-kernel view of a diagonal SSM: y = k * u, k_j = Σ_n C_n exp(jΔA_n) B_n Δ."""
    u = lin(x, p, "input.proj.proj")  # [B,T,D]
    delta = F.softplus(p["oscillation.delta.z"][0])  # [D]
    A = -torch.exp(p["oscillation.A_log"][0])  # [N,D]
    Bv, Cv = p["expand.proj.param"][0], p["shrink.proj.param"][0]  # [N]
    j = torch.arange(x.shape[1], dtype=torch.float64)
    kernel = torch.einsum("n,jnd,n->jd", Cv, torch.exp(j[:, None, None] * delta * A), Bv) * delta  # [T,D]
    y = torch.stack([(kernel[: t + 1].flip(0) * u[:, : t + 1]).sum(1) for t in range(x.shape[1])], dim=1)
    y = y + u * p["D"][0]
    return lin(y, p, "o_proj")


def lcsm_outer(m, p, x, tau=16.0):
    s = lin(x, p, "shrink.proj.proj")
    e = lin(x, p, "expand.proj.proj")
    i = lin(x, p, "input.proj.proj")
    o_k = torch.sigmoid(lin(x, p, "oscillation.gate_k.proj")) ** (1 / tau)
    o_v = torch.sigmoid(lin(x, p, "oscillation.gate_v.proj")) ** (1 / tau)
    mem = torch.zeros(x.shape[0], e.shape[-1], i.shape[-1], dtype=x.dtype)
    outs = []
    for t in range(x.shape[1]):
        mem = o_k[:, t, :, None] * o_v[:, t, None, :] * mem + e[:, t, :, None] * i[:, t, None, :]
        outs.append(torch.einsum("bk,bkv->bv", s[:, t], mem))
    y = layer_norm(torch.stack(outs, 1), p["out_norm.weight"], p["out_norm.bias"], m.out_norm.eps)
    return lin(y, p, "o_proj")


def cumsoftmax(m, p, x):
    """m_t = Σ_{s<=t} softmax_{r<=t}(z_r)_s e_s i_sᵀ per key feature, in the quadratic form."""
    H, T = m.H, x.shape[1]
    z = heads(lin(x, p, "oscillation.proj"), H).clamp(-10, 10)  # [B,T,H,K]
    q = heads(lin(x, p, "shrink.proj.proj"), H)
    k = heads(lin(x, p, "expand.proj.proj"), H)
    v = heads(lin(x, p, "input.proj.proj"), H)
    outs = []
    for t in range(T):
        w = torch.softmax(z[:, : t + 1], dim=1)  # over s <= t, per key feature
        mem = torch.einsum("bshk,bshv->bhkv", w * k[:, : t + 1], v[:, : t + 1])
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], mem))
    o = rms(torch.stack(outs, 1), p["out_norm.weight"], m.out_norm.eps)
    return lin(o.flatten(-2), p, "o_proj")


def transformer(m, p, x, base=10000.0):
    H, T = m.H, x.shape[1]
    q, k, v = (heads(lin(x, p, n), H) for n in ("q_proj", "k_proj", "v_proj"))
    Dh = q.shape[-1]
    freq = base ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]

    def rot(t):
        a, b = t[..., : Dh // 2], t[..., Dh // 2 :]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)

    q, k = rot(q), rot(k)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(Dh)
    scores = scores.masked_fill(~causal(T), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", torch.softmax(scores, -1), v)
    return lin(o.flatten(-2), p, "o_proj")


def mom(m, p, x, log_decay):
    """Mixture-of-Memories in its parallel form, one memory at a time: memory m holds
    Σ_{s<=t chosen} exp(Σ_{s<r<=t, r chosen} log o_r) k_s v_sᵀ; a token reads its top-k memories
    (weights renormalised) plus the shared one. log_decay: [B,T,H,K] (broadcast along K)."""
    H, K, M = m.H, m.K, m.M
    Bn, T = x.shape[:2]
    probs = torch.softmax(lin(x, p, "router.proj"), dim=-1)
    top, idx = probs.topk(m.top_k, dim=-1)
    w = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    chosen = torch.zeros_like(probs).scatter(-1, idx, 1.0)
    w = torch.cat([w, torch.ones_like(w[..., :1])], -1)
    chosen = torch.cat([chosen, torch.ones_like(chosen[..., :1])], -1)
    q = heads(m.shrink.proj.feature_map(lin(x, p, "shrink.proj.proj")), H) * K**-0.5
    k = m.expand.proj.feature_map(lin(x, p, "expand.proj.proj")).view(Bn, T, M, H, K)
    v = lin(x, p, "input.proj.proj").view(Bn, T, M, H, -1)
    past = causal(T)[None, :, :, None, None]
    y = 0
    for mem in range(M):
        c = chosen[..., mem]
        cs = torch.cumsum(log_decay * c[..., None, None], dim=1)
        diff = (cs[:, :, None] - cs[:, None, :]).masked_fill(~past, float("-inf"))
        scores = torch.einsum("bthk,bshk,btshk->btsh", q, k[:, :, mem] * c[..., None, None], torch.exp(diff))
        y = y + w[..., mem, None, None] * torch.einsum("btsh,bshv->bthv", scores, v[:, :, mem])
    o = rms(y, p["out_norm.weight"], m.out_norm.eps).flatten(-2)
    return lin(o * F.silu(lin(x, p, "gate_proj")), p, "o_proj")


def mom_gla(m, p, x):
    gate = F.logsigmoid(lin(lin(x, p, "oscillation.gate.proj.0"), p, "oscillation.gate.proj.1")) / 16
    return mom(m, p, x, heads(gate, m.H))


def mom_scalar(m, p, x):
    a = -F.softplus(lin(x, p, "oscillation.gate.proj")) * torch.exp(p["oscillation.gate.A_log"])  # [B,T,H]
    return mom(m, p, x, a[..., None].expand(*a.shape, m.K))


def l2norm(x):
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + 1e-6)  # fla's l2norm


def conv_silu(x, p, name):
    """fla's ShortConvolution with SiLU: depthwise causal conv (size 4) of the projection."""
    return F.silu(causal_conv(lin(x, p, name + ".proj"), p[name + ".conv.conv.weight"]))


def delta_rule(q, k, v, beta, log_alpha):
    """The gated delta rule as fla's naive recurrence computes it (state S [K,V] per head):
    S ← α S (α per head [B,T,H] or per key channel [B,T,H,K]); u = β (v − Sᵀk); S ← S + k uᵀ;
    o = Sᵀ q. q, k [B,T,H,K] (already normalised and scaled), v [B,T,H,V], β [B,T,H]."""
    Bn, T, H, K = q.shape
    S = torch.zeros(Bn, H, K, v.shape[-1], dtype=q.dtype)
    outs = []
    for t in range(T):
        if log_alpha is not None:
            a = torch.exp(log_alpha[:, t])
            S = S * (a[..., None, None] if a.dim() == 2 else a[..., None])
        u = beta[:, t, :, None] * (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k[:, t]))
        S = S + k[:, t, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    return torch.stack(outs, 1)


def delta_qkv(m, p, x):
    H, K = m.H, m.K
    q = l2norm(heads(conv_silu(x, p, "shrink.proj"), H)) * K**-0.5
    k = l2norm(heads(conv_silu(x, p, "expand.proj"), H))
    v = heads(conv_silu(x, p, "input.proj"), H)
    beta = torch.sigmoid(lin(x, p, "oscillation.beta_proj", bias=False))
    return q, k, v, beta


def deltanet(m, p, x):
    q, k, v, beta = delta_qkv(m, p, x)
    o = rms(delta_rule(q, k, v, beta, None), p["out_norm.weight"], m.out_norm.eps)
    return lin(o.flatten(-2), p, "o_proj")


def gated_deltanet(m, p, x):
    """fla's GatedDeltaNet: g = −exp(A_log)·softplus(a_proj(x) + dt_bias) per head (a_proj's bias
    is dt_bias here), output RMSNorm(o)·SiLU(g_proj(x)) per head."""
    q, k, v, beta = delta_qkv(m, p, x)
    g = -torch.exp(p["oscillation.inner.gate.A_log"]) * F.softplus(lin(x, p, "oscillation.inner.gate.proj"))
    o = rms(delta_rule(q, k, v, beta, g), p["out_norm.weight"], m.out_norm.eps)
    o = o * heads(F.silu(lin(x, p, "gate_proj")), m.H)
    return lin(o.flatten(-2), p, "o_proj")


def kda(m, p, x):
    """Kimi Delta Attention: a decay per key channel from a low-rank projection, the output gated by
    a low-rank sigmoid gate."""
    q, k, v, beta = delta_qkv(m, p, x)
    f = lin(lin(x, p, "oscillation.inner.gate.proj.0"), p, "oscillation.inner.gate.proj.1")
    g = -torch.exp(p["oscillation.inner.gate.A_log"]) * F.softplus(heads(f, m.H))
    o = rms(delta_rule(q, k, v, beta, g), p["out_norm.weight"], m.out_norm.eps)
    gate = torch.sigmoid(lin(lin(x, p, "gate_proj.0"), p, "gate_proj.1"))
    return lin((o * heads(gate, m.H)).flatten(-2), p, "o_proj")


def mom_gated_deltanet(m, p, x):
    """MoM over Gated DeltaNet memories, one memory at a time: memory j has its own key, value, β
    and decay projections and is updated only at the tokens routed to it (plus the shared memory,
    updated everywhere); a token reads its chosen memories, weighted, and the shared one."""
    H, K, M = m.H, m.K, m.M
    Bn, T = x.shape[:2]
    probs = torch.softmax(lin(x, p, "router.proj"), dim=-1)
    top, idx = probs.topk(m.top_k, dim=-1)
    w = torch.zeros_like(probs).scatter(-1, idx, top / top.sum(-1, keepdim=True))
    chosen = torch.zeros_like(probs).scatter(-1, idx, 1.0)
    w = torch.cat([w, torch.ones_like(w[..., :1])], -1)
    chosen = torch.cat([chosen, torch.ones_like(chosen[..., :1])], -1)
    q = l2norm(heads(conv_silu(x, p, "shrink.proj"), H)) * K**-0.5
    k = l2norm(conv_silu(x, p, "expand.proj").view(Bn, T, M, H, K))
    v = conv_silu(x, p, "input.proj").view(Bn, T, M, H, -1)
    beta = torch.sigmoid(lin(x, p, "oscillation.beta_proj", bias=False)).view(Bn, T, M, H)
    g = (-torch.exp(p["oscillation.inner.gate.A_log"]) * F.softplus(lin(x, p, "oscillation.inner.gate.proj"))).view(Bn, T, M, H)
    y = 0
    for mem in range(M):
        c = chosen[..., mem, None]  # [B,T,1]: an unchosen token leaves the memory as it was
        y = y + w[..., mem, None, None] * delta_rule(q, k[:, :, mem], v[:, :, mem], beta[:, :, mem] * c, g[:, :, mem] * c)
    o = rms(y, p["out_norm.weight"], m.out_norm.eps)
    return lin((o * heads(F.silu(lin(x, p, "gate_proj")), H)).flatten(-2), p, "o_proj")


PUBLISHED = {
    "linear_attention": linear_attention,
    "tnl": tnl,
    "retnet": retnet,
    "cosformer": cosformer,
    "gla": gla,
    "hgrn2": hgrn2,
    "mamba": mamba,
    "mamba2": mamba2,
    "s4d": s4d,
    "lcsm": lcsm_outer,
    "cumsoftmax": cumsoftmax,
    "transformer": transformer,
    "mom_gla": mom_gla,
    "mom_scalar": mom_scalar,
    "hybrid_gla": gla,  # layer LAYER is a GLA layer; the attention layer is checked below
    "deltanet": deltanet,
    "gated_deltanet": gated_deltanet,
    "kda": kda,
    "mom_gated_deltanet": mom_gated_deltanet,
    "hybrid_gated_deltanet": gated_deltanet,  # layer LAYER is a Gated DeltaNet layer; attention is layer 3
}


def test_every_zoo_model_has_an_independent_check():
    assert set(PUBLISHED) == set(zoo_names())


@pytest.mark.parametrize("name", sorted(zoo_paths()))
def test_zoo_spec_parses_builds_and_runs(name):
    spec = load_model_spec(zoo_paths()[name])
    assert spec.name == name
    model = Model.from_spec(zoo_paths()[name])
    tokens = torch.randint(0, spec.vocab_size, (2, 9))
    logits = model(tokens)
    assert logits.shape == (2, 9, spec.vocab_size)
    assert torch.isfinite(logits).all()
    logits.float().logsumexp(-1).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_zoo_mixer_equals_published_recurrence(name):
    torch.manual_seed(0)
    model = Model.from_spec(zoo_paths()[name]).double()
    with torch.no_grad():  # move every weight off its initial value (norm weights of 1, D of 1, ...)
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    mixer = model.blocks[LAYER].mixer
    params = dict(mixer.named_parameters())
    x = torch.randn(B, T, model.spec.d_model, dtype=torch.float64)
    with torch.no_grad():
        ours = mixer(x)
        if name == "tnl":
            theirs = tnl(mixer, params, x, model.spec.n_layers)
        elif name == "hgrn2":
            theirs = hgrn2(mixer, params, x, model.lower_bounds)
        else:
            theirs = PUBLISHED[name](mixer, params, x)
    err = (ours - theirs).norm() / theirs.norm()
    assert err < 1e-10, f"{name}: relative error {err:.3e}"


def test_hybrid_pattern_places_attention_every_eighth_layer():
    torch.manual_seed(0)
    model = Model.from_spec("hybrid_gla").double()
    kinds = [b.mixer.spec.kind for b in model.blocks]
    assert kinds == ["eos"] * 7 + ["attention"]
    mixer = model.blocks[7].mixer
    x = torch.randn(B, T, model.spec.d_model, dtype=torch.float64)
    with torch.no_grad():
        ours, theirs = mixer(x), transformer(mixer, dict(mixer.named_parameters()), x)
    assert (ours - theirs).norm() / theirs.norm() < 1e-10
