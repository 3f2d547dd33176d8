"""Every loss type against an independent loop implementation, gradients, weights, micro-batching, bad input."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from gepo.config import LOSS_TYPES, TRUNCATED_IS_TYPES, LossConfig
from gepo.objectives import compute_loss, delta_l_weights, importance_weights, m2po_log_bound

# ------------------------------------------------------------------------------------- loop reference (no torch)


def _ref_weights(lp, q, mask, gids, cfg):
    """Per row: a list of token weights (token level) or one float (sequence/group level)."""
    rows = range(len(lp))
    toks = [[t for t in range(len(lp[i])) if mask[i][t]] for i in rows]
    if cfg.loss_type in ("gspo", "gepo"):
        mp = [sum(lp[i][t] for t in toks[i]) / len(toks[i]) for i in rows]
        mq = [sum(q[i][t] for t in toks[i]) / len(toks[i]) for i in rows]
        if cfg.loss_type == "gspo":
            return [math.exp(mp[i] - mq[i]) for i in rows]
        if cfg.gepo_grouping == "micro_batch":
            gids = [i // cfg.gepo_micro_batch_rows for i in rows]
        out = []
        for i in rows:
            members = [j for j in rows if gids[j] == gids[i]]
            qbar = [math.exp(mq[j]) for j in members]
            expected_q = sum(x * x for x in qbar) / sum(qbar)
            out.append(math.exp(mp[i]) / expected_q)
        return out
    return [[math.exp(lp[i][t] - q[i][t]) for t in toks[i]] for i in rows]


def _ref_unit(w, a, cfg, low=None, high=None):
    low = 1 - cfg.epsilon_low if low is None else low
    high = 1 + cfg.epsilon_high if high is None else high
    w1 = min(w, cfg.delta) if cfg.delta is not None else w
    w2 = min(max(w, low), high)
    return -min(w1 * a, w2 * a)


def _ref_m2po_bounds(lp, q, toks, adv, budget):
    """M2PO's clip bounds (e^-tau, e^tau) by the reference code's loop (Infini-AI-Lab/M2PO core_algos.py)."""
    v = []
    for i, ts in enumerate(toks):
        for t in ts:
            r = math.exp(lp[i][t] - q[i][t])
            if (adv[i] > 1e-12 and r > 1 + 1e-12) or (adv[i] < -1e-12 and r < 1 - 1e-12):
                v.append((q[i][t] - lp[i][t]) ** 2)
    n = len(v)
    if n == 0 or sum(v) / n <= budget + 1e-12:
        return 0.0, math.inf
    v.sort()
    target, csum = budget * n, 0.0
    for k in range(n):
        csum += v[k]
        if (v[k] - 1e-12) * (n - k - 1) + csum >= target - 1e-12:
            tau = 0.0 if k == 0 else math.sqrt(v[k - 1] - 1e-12)
            return math.exp(-tau), math.exp(tau)
    raise AssertionError("unreachable: capping at the largest value gives the whole sum")


def _ref_token_unit(lp_t, w, a, cfg, bounds):
    """One token's loss for the token-level types (IcePop mask included)."""
    if cfg.icepop and not cfg.icepop_low <= w <= cfg.icepop_high:
        return 0.0
    if cfg.loss_type == "tis":
        return -min(w, cfg.tis_cap) * a  # times p / sg(p) = 1 in value
    if cfg.loss_type == "cispo":
        return -min(w, cfg.cispo_max_weight) * a * lp_t
    return _ref_unit(w, a, cfg, *bounds)


def _ref_loss(lp, q, mask, adv, gids, cfg, ref=None, step_rows=None, step_tokens=None, nmb=1):
    lp, q, mask, adv = lp.tolist(), q.tolist(), mask.tolist(), adv.tolist()
    gids = gids.tolist() if gids is not None else None
    ref = ref.tolist() if ref is not None else None
    B = len(lp)
    toks = [[t for t in range(len(lp[i])) if mask[i][t]] for i in range(B)]
    n_tok = sum(len(t) for t in toks)
    step_rows = step_rows or B
    step_tokens = step_tokens or n_tok
    M = cfg.max_completion_length
    w = _ref_weights(lp, q, mask, gids, cfg)

    def k3(d):
        return math.exp(d) - d - 1

    if cfg.loss_type in ("gspo", "gepo"):
        total = 0.0
        for i in range(B):
            row = _ref_unit(w[i], adv[i], cfg)
            if cfg.beta:
                row += cfg.beta * sum(k3(ref[i][t] - lp[i][t]) for t in toks[i]) / len(toks[i])
            total += row
        loss = total / step_rows
    else:
        bounds = _ref_m2po_bounds(lp, q, toks, adv, cfg.m2po_budget) if cfg.loss_type == "m2po" else (None, None)
        row_sums = []
        for i in range(B):
            s = 0.0
            for k, t in enumerate(toks[i]):
                s += _ref_token_unit(lp[i][t], w[i][k], adv[i], cfg, bounds)
                if cfg.beta:
                    s += cfg.beta * k3(ref[i][t] - lp[i][t])
            row_sums.append(s)
        agg = "delta_l" if cfg.loss_type == "delta_l" or cfg.aggregation == "delta_l" else cfg.loss_type
        agg = "dapo" if agg in ("tis", "cispo", "m2po") else agg
        if agg == "grpo":
            loss = sum(s / len(t) for s, t in zip(row_sums, toks)) / step_rows
        elif agg == "bnpo":
            loss = sum(row_sums) / n_tok / nmb
        elif agg == "dr_grpo":
            loss = sum(row_sums) / (step_rows * M)
        elif agg == "dapo":
            loss = sum(row_sums) / step_tokens
        else:
            z = sum(len(t) ** -cfg.delta_l_alpha for t in toks)
            loss = sum(s * (len(t) ** -cfg.delta_l_alpha / z) / M for s, t in zip(row_sums, toks)) / nmb
    if cfg.sampler_kl_coef:
        kl = sum(sum(k3(q[i][t] - lp[i][t]) for t in toks[i]) / len(toks[i]) for i in range(B))
        loss += cfg.sampler_kl_coef * kl / step_rows
    return loss


# ------------------------------------------------------------------------------------------------------ data


def _batch(B=8, T=6, G=4, dtype=torch.float64, seed=0, spread=0.3, lengths=None):
    """Learner/sampler/ref log-probs with ratios spread enough to hit both clip sides; B/G prompts."""
    g = torch.Generator().manual_seed(seed)
    q = -torch.rand(B, T, generator=g, dtype=dtype) * 2 - 0.05
    logp = q + spread * torch.randn(B, T, generator=g, dtype=dtype)
    ref = q + 0.2 * torch.randn(B, T, generator=g, dtype=dtype)
    lengths = lengths if lengths is not None else [T - (i * 5) % T // 2 for i in range(B)]
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    adv = torch.randn(B, generator=g, dtype=dtype)
    gids = torch.arange(B) // G
    return logp, q, mask, adv, gids, ref


CONFIGS = [
    LossConfig(loss_type=t, **kw)
    for t in LOSS_TYPES
    for kw in (
        {},
        {"epsilon_low": 0.1, "epsilon_high": 0.28, "beta": 0.04, "sampler_kl_coef": 0.005,
         **({} if t in TRUNCATED_IS_TYPES else {"delta": 1.5})},  # fmt: skip
    )
] + [
    LossConfig(loss_type="tis", tis_cap=1.1),
    LossConfig(loss_type="cispo", cispo_max_weight=1.1),
    LossConfig(loss_type="m2po", m2po_budget=0.5),  # within budget: no clip
    LossConfig(loss_type="m2po", m2po_budget=0.01),
    LossConfig(loss_type="grpo", icepop=True, icepop_low=0.8, icepop_high=1.25),
    LossConfig(loss_type="dapo", icepop=True),
    LossConfig(loss_type="tis", icepop=True, icepop_low=0.8, icepop_high=1.25, tis_cap=1.1),
    LossConfig(loss_type="cispo", icepop=True, icepop_low=0.8, icepop_high=1.25),
    LossConfig(loss_type="m2po", icepop=True, icepop_low=0.8, icepop_high=1.25),
    LossConfig(loss_type="delta_l", icepop=True, icepop_low=0.8, icepop_high=1.25, max_completion_length=9),
] + [
    LossConfig(loss_type="gepo", gepo_grouping="micro_batch", gepo_micro_batch_rows=3),
    LossConfig(loss_type="grpo", aggregation="delta_l", delta_l_alpha=0.75, max_completion_length=10),
    LossConfig(loss_type="delta_l", delta_l_alpha=0.0, max_completion_length=9),
]


def _id(cfg):
    extra = {"tis": f"-C{cfg.tis_cap}", "cispo": f"-C{cfg.cispo_max_weight}", "m2po": f"-M{cfg.m2po_budget}"}
    return (f"{cfg.loss_type}-{cfg.aggregation}-{cfg.gepo_grouping}-d{cfg.delta}-b{cfg.beta}"
            f"{extra.get(cfg.loss_type, '')}{'-icepop' if cfg.icepop else ''}")  # fmt: skip


# ----------------------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_loss_matches_loop_reference(cfg):
    logp, q, mask, adv, gids, ref = _batch()
    loss, metrics = compute_loss(logp, q, mask, adv, gids, cfg, ref_logp=ref)
    expected = _ref_loss(logp, q, mask, adv, gids, cfg, ref=ref)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert metrics["loss"] == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_batch_hits_both_clip_sides_and_the_delta_cap():
    # Guards the reference test above: it must exercise clipping, not only the linear region.
    logp, q, mask, adv, gids, ref = _batch()
    cfg = LossConfig(loss_type="grpo", epsilon_low=0.1, epsilon_high=0.28, delta=1.5)
    _, m = compute_loss(logp, q, mask, adv, gids, cfg)
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0 and m["iw_max"] > 1.5


def test_gepo_weight_by_hand():
    # Two one-token rows in one group: q̄ = (0.5, 0.25), p̄ = (0.5, 0.4).
    # E_q[q] = (0.25 + 0.0625) / 0.75 = 5/12 -> w = (0.5 * 12/5, 0.4 * 12/5) = (1.2, 0.96).
    q = torch.tensor([[math.log(0.5)], [math.log(0.25)]], dtype=torch.float64)
    logp = torch.tensor([[math.log(0.5)], [math.log(0.4)]], dtype=torch.float64)
    mask = torch.ones(2, 1, dtype=torch.bool)
    w, level = importance_weights(logp, q, mask, torch.tensor([0, 0]), LossConfig(loss_type="gepo"))
    assert level == "group"
    torch.testing.assert_close(w, torch.tensor([1.2, 0.96], dtype=torch.float64))
    # With A = (1, -1), eps 0.2: row 0 clipped to 1.2 (=w), row 1 unclipped: loss = (-1.2 + 0.96) / 2.
    loss, _ = compute_loss(logp, q, mask, torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([0, 0]),
                           LossConfig(loss_type="gepo"))  # fmt: skip
    assert loss.item() == pytest.approx((-1.2 + 0.96) / 2)


def test_grpo_by_hand():
    # Row 0: tokens r = (1.5, 0.5), A = +1 -> units -min(1.5, 1.2) = -1.2 and -min(0.5, 0.8) = -0.5, mean -0.85.
    # Row 1: one token r = 2, A = -1 -> -min(-2, -1.2) = 2. GRPO: (-0.85 + 2) / 2 = 0.575.
    q = torch.log(torch.tensor([[0.2, 0.4], [0.1, 0.3]], dtype=torch.float64))
    logp = torch.log(torch.tensor([[0.3, 0.2], [0.2, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, m = compute_loss(logp, q, mask, adv, None, LossConfig(loss_type="grpo"))
    assert loss.item() == pytest.approx(0.575)
    assert m["clip_frac_high"] == pytest.approx(1 / 3) and m["clip_frac_low"] == 0.0
    # bnpo: (-1.2 - 0.5 + 2) / 3; dr_grpo with M = 4: 0.3 / (2 * 4); gspo/gepo use row means instead.
    assert compute_loss(logp, q, mask, adv, None, LossConfig(loss_type="bnpo"))[0].item() == pytest.approx(0.1)
    dr = LossConfig(loss_type="dr_grpo", max_completion_length=4)
    assert compute_loss(logp, q, mask, adv, None, dr)[0].item() == pytest.approx(0.3 / 8)
    # delta cap 1.5 turns row 1's unit into -min(-1.5, -1.2) = 1.5.
    capped = LossConfig(loss_type="grpo", delta=1.5)
    assert compute_loss(logp, q, mask, adv, None, capped)[0].item() == pytest.approx((-0.85 + 1.5) / 2)


def _hand_batch():
    # Row 0: tokens with ratio (1.5, 0.5), A = +1; row 1: one token with ratio 2, A = -1 (as test_grpo_by_hand).
    q = torch.log(torch.tensor([[0.2, 0.4], [0.1, 0.3]], dtype=torch.float64))
    logp = torch.log(torch.tensor([[0.3, 0.2], [0.2, 0.9]], dtype=torch.float64))
    mask = torch.tensor([[True, True], [True, False]])
    return logp, q, mask, torch.tensor([1.0, -1.0], dtype=torch.float64)


def test_tis_cispo_by_hand():
    logp, q, mask, adv = _hand_batch()
    # TIS, cap 2: units -min(w, 2) A = -1.5, -0.5, +2; token mean over N = 3 tokens: 0. Cap 1.2: -1.2, -0.5, +1.2.
    loss, m = compute_loss(logp, q, mask, adv, None, LossConfig(loss_type="tis"))
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and m["clip_frac_high"] == 0.0
    loss, m = compute_loss(logp, q, mask, adv, None, LossConfig(loss_type="tis", tis_cap=1.2))
    assert loss.item() == pytest.approx(-0.5 / 3) and m["clip_frac_high"] == pytest.approx(2 / 3)
    # CISPO, cap 5: -(1.5 ln 0.3 + 0.5 ln 0.2 - 2 ln 0.2) / 3 = 0.5 ln(2/3); gradient -min(w, 5) A / 3 per token.
    leaf = logp.clone().requires_grad_()
    loss, m = compute_loss(leaf, q, mask, adv, None, LossConfig(loss_type="cispo"))
    loss.backward()
    assert loss.item() == pytest.approx(0.5 * math.log(2 / 3)) and m["clip_frac_high"] == 0.0
    torch.testing.assert_close(leaf.grad, torch.tensor([[-0.5, -1 / 6], [2 / 3, 0.0]], dtype=torch.float64))


def test_m2po_by_hand():
    logp, q, mask, adv = _hand_batch()
    # The PPO clip acts only on token (0, 0): A > 0 and ratio 1.5 > 1; its d^2 = ln(1.5)^2 = 0.164 > 0.04, so the
    # bound is tau = 0 (k = 0): clip to [1, 1]. Units: -min(1.5, 1) = -1, -min(0.5, 1) = -0.5, -min(-2, -1) = 2.
    loss, m = compute_loss(logp, q, mask, adv, None, LossConfig(loss_type="m2po"))
    assert loss.item() == pytest.approx(0.5 / 3)
    assert m["clip_frac_high"] == pytest.approx(1 / 3) and m["clip_frac_low"] == 0.0
    # A budget above 0.164: no clip at all, the plain policy gradient -w A: (-1.5 - 0.5 + 2) / 3 = 0.
    loss, m = compute_loss(logp, q, mask, adv, None, LossConfig(loss_type="m2po", m2po_budget=0.2))
    assert loss.item() == pytest.approx(0.0, abs=1e-15) and m["clip_frac_high"] == 0.0


def test_m2po_bound_by_hand():
    # Three clip-side tokens with d = 0.1, 0.3, 0.5 (A > 0, ratio > 1): v = 0.01, 0.09, 0.25, mean 0.1167.
    d = torch.tensor([[0.1, 0.3, 0.5]], dtype=torch.float64)
    mask, adv = torch.ones(1, 3, dtype=torch.bool), torch.ones(1, dtype=torch.float64)
    # budget 0.04, target 0.12: capping at v_0 sums 0.03, at v_1 0.19 >= 0.12, so k = 1 and tau^2 = v_0.
    assert m2po_log_bound(d, adv, mask, 0.04) == pytest.approx(0.1)
    # budget 0.07, target 0.21: capping at v_1 sums 0.19 < 0.21, at v_2 0.35, so tau^2 = v_1.
    assert m2po_log_bound(d, adv, mask, 0.07) == pytest.approx(0.3)
    assert m2po_log_bound(d, adv, mask, 0.12) == math.inf  # within budget
    assert m2po_log_bound(-d, adv, mask, 0.04) == math.inf  # A > 0 with ratio < 1: not on the clip side
    assert m2po_log_bound(-d, -adv, mask, 0.04) == pytest.approx(0.1)
    # the capped second moment at the bound is within the budget
    tau = m2po_log_bound(d, adv, mask, 0.04)
    assert (torch.clamp(d**2, max=tau**2).mean() <= 0.04).item()


def test_icepop_by_hand():
    logp, q, mask, adv = _hand_batch()
    # beta = 1.8 masks the ratio-2 token (row 1): GRPO = (-0.85 + 0) / 2; a ratio on the bound (0.5) is kept.
    cfg = LossConfig(loss_type="grpo", icepop=True, icepop_high=1.8)
    leaf = logp.clone().requires_grad_()
    loss, m = compute_loss(leaf, q, mask, adv, None, cfg)
    loss.backward()
    assert loss.item() == pytest.approx(-0.425) and m["mask_frac"] == pytest.approx(1 / 3)
    assert leaf.grad[1, 0] == 0.0 and leaf.grad[0, 1] != 0.0
    # IcePop's own form, -M(sg(w)) A grad log p with M(k) = k inside [alpha, beta], is TIS with a cap >= beta.
    tis = compute_loss(logp, q, mask, adv, None, LossConfig(loss_type="tis", tis_cap=5.0, icepop=True, icepop_high=1.8))
    assert tis[0].item() == pytest.approx((-1.5 - 0.5) / 3)


ON_POLICY_TYPES = ["tis", "cispo", "m2po"]


@pytest.mark.parametrize("loss_type", ON_POLICY_TYPES)
@pytest.mark.parametrize("icepop", [False, True])
def test_on_policy_limit_is_the_token_mean_policy_gradient(loss_type, icepop):
    # p = q: every weight is 1, nothing is truncated, clipped or masked; TIS and M2PO are then exactly DAPO (token
    # mean of -A, gradient -A grad log p / N), CISPO has DAPO's gradient (its value is -A log p / N instead).
    _, logp, mask, adv, gids, _ = _batch(B=8, T=6)  # the sampler's log-probs, as the learner's too
    q = logp.clone()
    base_leaf = logp.clone().requires_grad_()
    base, bm = compute_loss(base_leaf, q, mask, adv, gids, LossConfig(loss_type="dapo"))
    base.backward()
    leaf = logp.clone().requires_grad_()
    loss, m = compute_loss(leaf, q, mask, adv, gids, LossConfig(loss_type=loss_type, icepop=icepop))
    loss.backward()
    torch.testing.assert_close(leaf.grad, base_leaf.grad)
    if loss_type == "cispo":
        expected = -(adv.unsqueeze(1) * logp)[mask].sum() / mask.sum()
        torch.testing.assert_close(loss, expected)
    else:
        torch.testing.assert_close(loss, base)
    assert m["clip_frac_low"] == m["clip_frac_high"] == m["mask_frac"] == 0.0 and m["iw_var"] == 0.0
    assert m2po_log_bound(logp - q, adv, mask, 0.04) == math.inf


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "delta_l", "tis", "cispo", "m2po"])
def test_icepop_on_policy_changes_nothing(loss_type):
    _, logp, mask, adv, gids, _ = _batch(B=8, T=6)
    outs = []
    for icepop in (False, True):
        leaf = logp.clone().requires_grad_()
        loss, _ = compute_loss(leaf, logp.clone(), mask, adv, gids, LossConfig(loss_type=loss_type, icepop=icepop))
        loss.backward()
        outs.append((loss, leaf.grad))
    torch.testing.assert_close(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1])


# -------------------------------------------------------------------------------------------------- gradients


def _gradient_is_the_derivative_of_the_value(cfg):
    # TIS / CISPO detach their weight, M2PO its clip bound (a constant of the step, as in the reference code): their
    # gradients are checked against finite differences with those held fixed, below.
    return cfg.loss_type not in TRUNCATED_IS_TYPES and not (cfg.loss_type == "m2po" and cfg.m2po_budget < 0.04)


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if _gradient_is_the_derivative_of_the_value(c)], ids=_id)
def test_gradcheck(cfg):
    logp, q, mask, adv, gids, ref = _batch(B=6, T=4, G=3, seed=1, spread=0.15)
    logp.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: compute_loss(x, q, mask, adv, gids, cfg, ref_logp=ref)[0], (logp,), eps=1e-7, atol=1e-6
    )


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.loss_type == "cispo"], ids=_id)
def test_cispo_gradient_is_finite_difference_with_the_weight_held_fixed(cfg):
    # CISPO's weight is detached by design, so its gradient is not the derivative of its value in logp. It is the
    # derivative with the weight held fixed: moving the sampler's log-probs with the learner's keeps every ratio
    # (hence every weight and IcePop mask) constant while log p moves. The sampler-KL term is checked by the other
    # types' gradchecks; here it would move with q, so it is left out.
    cfg = dataclasses.replace(cfg, sampler_kl_coef=0.0)
    logp, q, mask, adv, gids, ref = _batch(B=6, T=4, G=3, seed=1, spread=0.3)
    x0 = logp.clone()
    logp.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: compute_loss(x, q + (x - x0), mask, adv, gids, cfg, ref_logp=ref)[0], (logp,), eps=1e-7, atol=1e-6
    )


@pytest.mark.parametrize("icepop", [False, True])
def test_m2po_gradient_is_the_ppo_gradient_at_its_bound(icepop):
    # M2PO = the PPO clip with [e^-tau, e^tau], tau fixed for the step: same loss and gradient as a token-mean PPO
    # loss (dapo, gradchecked above) with eps_low = 1 - e^-tau, eps_high = e^tau - 1.
    logp, q, mask, adv, gids, _ = _batch(B=8, T=6, seed=4, spread=0.5)
    kw = {"icepop": icepop, "icepop_low": 0.6, "icepop_high": 1.6}
    tau = m2po_log_bound(logp - q, adv, mask, 0.04)
    assert 0 < tau < 0.5  # the budget binds for this batch
    out = []
    for cfg in (LossConfig(loss_type="m2po", **kw),
                LossConfig(loss_type="dapo", epsilon_low=1 - math.exp(-tau), epsilon_high=math.exp(tau) - 1, **kw)):
        leaf = logp.clone().requires_grad_()
        loss, m = compute_loss(leaf, q, mask, adv, gids, cfg)
        loss.backward()
        out.append((loss, leaf.grad, m))
    torch.testing.assert_close(out[0][0], out[1][0])
    torch.testing.assert_close(out[0][1], out[1][1])
    for key in ("clip_frac_low", "clip_frac_high", "mask_frac"):
        assert out[0][2][key] == pytest.approx(out[1][2][key])
    assert out[0][2]["clip_frac_low"] + out[0][2]["clip_frac_high"] > 0


@pytest.mark.parametrize("icepop", [False, True])
@pytest.mark.parametrize("cap", [1.1, 2.0, 5.0])
def test_tis_gradient_equals_cispo_with_the_same_cap(cap, icepop):
    # With one update per batch, TIS (-sg(min(w, C)) A p/sg(p)) and CISPO (-sg(min(w, C)) A log p) differ in value
    # but not in gradient: both are min(w, C) A grad log p. CISPO's gradient is finite-difference checked above.
    logp, q, mask, adv, gids, _ = _batch(B=8, T=6, seed=3, spread=0.5)
    kw = {"icepop": icepop, "icepop_low": 0.8, "icepop_high": 1.25}
    grads = []
    for cfg in (LossConfig(loss_type="tis", tis_cap=cap, **kw), LossConfig(loss_type="cispo", cispo_max_weight=cap, **kw)):
        leaf = logp.clone().requires_grad_()
        compute_loss(leaf, q, mask, adv, gids, cfg)[0].backward()
        grads.append(leaf.grad)
    torch.testing.assert_close(grads[0], grads[1])
    w = torch.exp(logp - q)
    expected = -torch.clamp(w, max=cap) * adv.unsqueeze(1) * mask / mask.sum()
    if icepop:
        expected = expected * ((w >= 0.8) & (w <= 1.25))
    torch.testing.assert_close(grads[0], expected)


# ------------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("loss_type", ["grpo", "gspo"])
def test_on_policy_weight_is_exactly_one_and_carries_gradient(loss_type):
    logp, _, mask, _, gids, _ = _batch(dtype=torch.float32)
    logp.requires_grad_()
    w, level = importance_weights(logp, logp.detach().clone(), mask, gids, LossConfig(loss_type=loss_type))
    assert level == ("token" if loss_type == "grpo" else "sequence")
    assert (w[mask] if level == "token" else w).eq(1.0).all()
    (w[mask] if level == "token" else w).sum().backward()
    expected = mask.double() if level == "token" else mask.double() / mask.sum(-1, keepdim=True)
    torch.testing.assert_close(logp.grad.double(), expected)


def test_gepo_on_policy_is_relative_reweighting_not_one():
    logp, _, mask, _, gids, _ = _batch()
    w, _ = importance_weights(logp, logp, mask, gids, LossConfig(loss_type="gepo"))
    pbar = torch.exp((logp * mask).sum(-1) / mask.sum(-1))
    for g in gids.unique():
        sel = gids == g
        torch.testing.assert_close(w[sel], pbar[sel] / ((pbar[sel] ** 2).sum() / pbar[sel].sum()))
    assert not torch.allclose(w, torch.ones_like(w))


def test_gepo_micro_batch_grouping():
    logp, q, mask, _, _, _ = _batch(B=8)
    interleaved = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])  # prompts alternate, as after a shuffle
    by_prompt, _ = importance_weights(logp, q, mask, interleaved, LossConfig(loss_type="gepo"))
    mb_cfg = LossConfig(loss_type="gepo", gepo_grouping="micro_batch", gepo_micro_batch_rows=4)
    by_block, _ = importance_weights(logp, q, mask, interleaved, mb_cfg)
    lists = [x.tolist() for x in (logp, q, mask)]
    torch.testing.assert_close(by_prompt, torch.tensor(_ref_weights(*lists, interleaved.tolist(), LossConfig()),
                                                       dtype=torch.float64))  # fmt: skip
    torch.testing.assert_close(by_block, torch.tensor(_ref_weights(*lists, None, mb_cfg), dtype=torch.float64))
    assert not torch.allclose(by_prompt, by_block)
    # When the blocks coincide with the prompts, the two groupings agree.
    blocks = torch.arange(8) // 4
    torch.testing.assert_close(importance_weights(logp, q, mask, blocks, LossConfig(loss_type="gepo"))[0], by_block)


def test_gepo_denominator_does_not_underflow_for_long_completions():
    T = 4000
    q = torch.full((4, T), -150.0)  # mean log-prob -150: q̄ = e^-150 and q̄^2 = e^-300 underflow float32 to 0
    logp = q.clone()
    mask = torch.ones(4, T, dtype=torch.bool)
    w, _ = importance_weights(logp, q, mask, torch.zeros(4, dtype=torch.long), LossConfig(loss_type="gepo"))
    torch.testing.assert_close(w, torch.ones(4))


def test_delta_l_weights():
    lengths = torch.tensor([3, 10, 250, 7])
    for alpha in (0.0, 0.75, 1.0, 3.0):
        x = delta_l_weights(lengths, alpha)
        assert x.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(delta_l_weights(lengths, 0.0), torch.full((4,), 0.25))
    inv = 1.0 / lengths.double()
    torch.testing.assert_close(delta_l_weights(lengths, 1.0).double(), inv / inv.sum(), rtol=1e-6, atol=1e-7)


def test_delta_l_alpha_zero_is_dr_grpo():
    logp, q, mask, adv, gids, _ = _batch()
    dr, _ = compute_loss(logp, q, mask, adv, gids, LossConfig(loss_type="dr_grpo", max_completion_length=9))
    for cfg in (LossConfig(loss_type="delta_l", delta_l_alpha=0.0, max_completion_length=9),
                LossConfig(loss_type="dr_grpo", aggregation="delta_l", delta_l_alpha=0.0, max_completion_length=9)):
        torch.testing.assert_close(compute_loss(logp, q, mask, adv, gids, cfg)[0], dr)  # fmt: skip


# ------------------------------------------------------------------------------------------------ micro-batches


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_micro_batches_sum_to_full_batch_loss_and_grad(cfg):
    # Two micro-batches of 4 rows, each one prompt group of 4 (and one micro_batch block when rows divide 4), with
    # the same length multiset so bnpo's token count and ∆L's sum of L^-alpha are equal across them.
    cfg_mb = cfg
    if cfg.loss_type == "m2po" and cfg.m2po_budget < 0.5:
        pytest.skip("M2PO's clip bound is a function of each call's tokens (as in the reference code)")
    if cfg.gepo_grouping == "micro_batch":
        cfg_mb = LossConfig(loss_type="gepo", gepo_grouping="micro_batch", gepo_micro_batch_rows=2)
    logp, q, mask, adv, gids, ref = _batch(B=8, G=4, lengths=[6, 3, 5, 2, 2, 5, 6, 3])
    full_leaf = logp.clone().requires_grad_()
    full, _ = compute_loss(full_leaf, q, mask, adv, gids, cfg_mb, ref_logp=ref)
    full.backward()
    split_leaf = logp.clone().requires_grad_()
    total = 0.0
    kw = {"step_rows": 8, "step_tokens": int(mask.sum()), "num_micro_batches": 2}
    for sl in (slice(0, 4), slice(4, 8)):
        part, _ = compute_loss(split_leaf[sl], q[sl], mask[sl], adv[sl], gids[sl], cfg_mb, ref_logp=ref[sl], **kw)
        part.backward()
        total = total + part.item()
    assert total == pytest.approx(full.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(split_leaf.grad, full_leaf.grad)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "gspo"])
def test_uneven_micro_batches_sum_for_step_normalised_types(loss_type):
    logp, q, mask, adv, gids, _ = _batch(B=8)
    cfg = LossConfig(loss_type=loss_type, sampler_kl_coef=0.01)
    full, _ = compute_loss(logp, q, mask, adv, gids, cfg)
    kw = {"step_rows": 8, "step_tokens": int(mask.sum()), "num_micro_batches": 3}
    parts = [compute_loss(logp[s], q[s], mask[s], adv[s], gids[s], cfg, **kw)[0] for s in
             (slice(0, 1), slice(1, 6), slice(6, 8))]  # fmt: skip
    assert sum(p.item() for p in parts) == pytest.approx(full.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------------- metrics


def test_metrics():
    logp, q, mask, adv, gids, ref = _batch()
    _, m = compute_loss(logp, q, mask, adv, gids, LossConfig(loss_type="gspo", beta=0.1), ref_logp=ref)
    expected_keys = {"loss", "iw_mean", "iw_var", "iw_max", "clip_frac_low", "clip_frac_high", "mask_frac",
                     "log_ratio_m2", "kl_ref", "kl_sampler", "adv_mean", "adv_std", "adv_abs_max",
                     "num_tokens"}  # fmt: skip
    assert set(m) == expected_keys and all(isinstance(v, float) for v in m.values())
    s = torch.exp((logp * mask).sum(-1) / mask.sum(-1) - (q * mask).sum(-1) / mask.sum(-1))
    assert m["iw_mean"] == pytest.approx(s.mean().item()) and m["iw_max"] == pytest.approx(s.max().item())
    assert m["iw_var"] == pytest.approx(s.var(unbiased=False).item())
    assert m["clip_frac_low"] == pytest.approx(((s < 0.8) & (adv < 0)).double().mean().item())
    assert m["clip_frac_high"] == pytest.approx(((s > 1.2) & (adv > 0)).double().mean().item())
    d = (q - logp)[mask]
    assert m["kl_sampler"] == pytest.approx((d.exp() - d - 1).mean().item())
    assert m["num_tokens"] == float(mask.sum())
    assert m["log_ratio_m2"] == pytest.approx((d**2).mean().item()) and m["mask_frac"] == 0.0
    assert m["adv_abs_max"] == pytest.approx(adv.abs().max().item())


# --------------------------------------------------------------------------------------------------- bad input


def _call(**over):
    logp, q, mask, adv, gids, ref = _batch(dtype=torch.float32)
    args = {"logp": logp, "sampler_logp": q, "mask": mask, "advantages": adv, "group_ids": gids,
            "cfg": LossConfig(), "ref_logp": None}  # fmt: skip
    args.update(over)
    return compute_loss(**args)


def _with(x, r, t, v):
    x = x.clone()
    x[(r, t) if x.dim() == 2 else r] = v
    return x


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda b: {"sampler_logp": b[1][:, :3]}, "sampler_logp must have"),
        (lambda b: {"mask": b[2][:5]}, "mask must have"),
        (lambda b: {"advantages": b[3][:5]}, "advantages must be"),
        (lambda b: {"group_ids": b[4][:5]}, "group_ids must be"),
        (lambda b: {"mask": b[2].float()}, "mask must be bool"),
        (lambda b: {"logp": b[0][:0], "sampler_logp": b[1][:0], "mask": b[2][:0], "advantages": b[3][:0],
                    "group_ids": b[4][:0]}, "empty batch"),  # fmt: skip
        (lambda b: {"mask": _with(b[2], 2, slice(None), False)}, "row 2 has no completion tokens"),
        (lambda b: {"logp": _with(b[0], 3, 1, float("nan"))}, "logp of row 3"),
        (lambda b: {"sampler_logp": _with(b[1], 4, 0, -float("inf"))}, "sampler_logp of row 4"),
        (lambda b: {"advantages": _with(b[3], 5, slice(None), float("inf"))}, "advantage of row 5"),
        (lambda b: {"sampler_logp": _with(b[1], 1, 2, 0.5)}, r"row 1, token 2 is 0.5 > 0"),
        (lambda b: {"cfg": LossConfig(beta=0.1)}, "needs ref_logp"),
        (lambda b: {"group_ids": None}, "needs group_ids"),
        (lambda b: {"group_ids": b[4].float()}, "integer"),
        (lambda b: {"cfg": {"loss_type": "gepo"}}, "LossConfig"),
    ],
)
def test_bad_input_raises(make, match):
    b = _batch(dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        _call(**make(b))


def test_padding_may_hold_garbage():
    logp, q, mask, adv, gids, _ = _batch(dtype=torch.float32)
    clean, _ = compute_loss(logp, q, mask, adv, gids, LossConfig(loss_type="grpo"))
    pad = ~mask
    logp_g = logp.masked_fill(pad, float("nan")).requires_grad_()
    dirty, _ = compute_loss(logp_g, q.masked_fill(pad, 7.0), mask, adv, gids, LossConfig(loss_type="grpo"))
    dirty.backward()
    assert dirty.item() == clean.item() and torch.isfinite(logp_g.grad).all()


@pytest.mark.parametrize("loss_type", ["grpo", "gspo", "gepo"])
@pytest.mark.parametrize("a0", [-1.0, 0.0, 1.0])
def test_huge_weight_gives_finite_loss_and_gradient(loss_type, a0):
    # exp(logp - q) would overflow float32 (log-weight ~ 200); 0 * inf or inf - inf must not become a NaN gradient.
    logp, q, mask, adv, gids, _ = _batch(dtype=torch.float32)
    # GEPO's weight is relative to its group's sampler probabilities: the whole group must be far off.
    q = _with(q, slice(0, 4) if loss_type == "gepo" else 0, slice(None), -250.0)
    adv = _with(adv, 0, None, a0)
    for delta in (None, 2.0):
        leaf = logp.clone().requires_grad_()
        loss, m = compute_loss(leaf, q, mask, adv, gids, LossConfig(loss_type=loss_type, delta=delta))
        loss.backward()
        assert math.isfinite(loss.item()) and torch.isfinite(leaf.grad).all()
        assert m["iw_max"] == pytest.approx(math.exp(40.0), rel=1e-4)


def test_overflowing_loss_raises_not_nan():
    logp, q, mask, adv, gids, _ = _batch(dtype=torch.float32)
    adv = _with(adv, 3, None, -1e37)  # finite, but w * A overflows float32
    logp = _with(logp, 3, 0, q[3, 0].item() + 5.0)
    with pytest.raises(ValueError, match="overflowed.*row 3"):
        compute_loss(logp, q, mask, adv, gids, LossConfig(loss_type="grpo"))


def test_step_arguments_validated():
    with pytest.raises(ValueError, match="step_rows"):
        _call(step_rows=3)
    with pytest.raises(ValueError, match="step_tokens"):
        _call(step_tokens=1)
    with pytest.raises(ValueError, match="num_micro_batches"):
        _call(num_micro_batches=0)


# ------------------------------------------------------------------------------------------------------ config


def test_config_defaults_and_resolution():
    cfg = LossConfig()
    assert cfg.loss_type == "gepo" and cfg.epsilon_low == cfg.epsilon_high == 0.2 and cfg.delta is None
    auto = {t: LossConfig(loss_type=t).resolved_advantage_std() for t in LOSS_TYPES}
    assert auto == {"grpo": "group", "bnpo": "group", "dapo": "group", "gspo": "group", "gepo": "none",
                    "dr_grpo": "none", "delta_l": "none", "tis": "group", "cispo": "group",
                    "m2po": "group"}  # fmt: skip
    for t in ("tis", "cispo", "m2po"):
        assert LossConfig(loss_type=t).resolved_aggregation() == "dapo"
        assert LossConfig(loss_type=t).weight_level() == "token"
    d = LossConfig()
    assert (d.tis_cap, d.cispo_max_weight, d.m2po_budget, d.icepop, d.icepop_low, d.icepop_high) == (
        2.0, 5.0, 0.04, False, 0.5, 5.0)  # fmt: skip
    assert LossConfig(loss_type="gepo", advantage_std="batch").resolved_advantage_std() == "batch"
    assert LossConfig(loss_type="dapo", aggregation="delta_l").resolved_aggregation() == "delta_l"
    assert LossConfig(loss_type="delta_l").weight_level() == "token"


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"loss_type": "ppo"}, "loss_type"),
        ({"advantage_std": "std"}, "advantage_std"),
        ({"gepo_grouping": "batch"}, "gepo_grouping"),
        ({"aggregation": "token_mean"}, "aggregation"),
        ({"loss_type": "gspo", "aggregation": "delta_l"}, "token-level"),
        ({"epsilon_low": 1.0}, "epsilon_low"),
        ({"epsilon_high": -0.1}, "epsilon_high"),
        ({"delta": 1.1}, "delta"),
        ({"delta": float("nan")}, "delta"),
        ({"gepo_micro_batch_rows": 0}, "gepo_micro_batch_rows"),
        ({"max_completion_length": 2.5}, "max_completion_length"),
        ({"logprob_chunk_rows": True}, "logprob_chunk_rows"),
        ({"delta_l_alpha": -1.0}, "delta_l_alpha"),
        ({"beta": -0.1}, "beta"),
        ({"sampler_kl_coef": float("nan")}, "sampler_kl_coef"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": "0.6"}, "temperature"),
        ({"loss_type": "tis", "delta": 3.0}, "no PPO term"),
        ({"loss_type": "cispo", "delta": 3.0}, "no PPO term"),
        ({"tis_cap": 0.0}, "tis_cap"),
        ({"cispo_max_weight": -1.0}, "cispo_max_weight"),
        ({"m2po_budget": 0.0}, "m2po_budget"),
        ({"icepop": 1}, "icepop must be a bool"),
        ({"loss_type": "gspo", "icepop": True}, "token-level"),
        ({"loss_type": "grpo", "icepop": True, "icepop_low": 1.0}, "icepop_low"),
        ({"loss_type": "grpo", "icepop": True, "icepop_high": 0.9}, "icepop_high"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        LossConfig(**kw)
