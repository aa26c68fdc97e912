"""minivit.optim against PyTorch: AdamW, SGD, clipping step by step; the schedule; resuming.

Budget: < 15 s. Oracles: torch.optim.AdamW, torch.optim.SGD, torch.nn.utils.clip_grad_norm_,
transformers.get_cosine_schedule_with_warmup.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from minivit.optim import (
    SGD,
    AdamW,
    WarmupCosine,
    clip_grad_norm,
    default_no_decay,
    global_grad_norm,
    warmup_cosine_lr,
)

# A miniature ViT's parameter names, so both decay groups are exercised by the default rule.
SHAPES = {
    "cls_token": (1, 1, 4),
    "pos_embed": (1, 3, 4),
    "patch_embed.proj.weight": (4, 3, 2, 2),
    "patch_embed.proj.bias": (4,),
    "blocks.0.norm1.weight": (4,),
    "blocks.0.attn.qkv.weight": (12, 4),
    "blocks.0.attn.qkv.bias": (12,),
    "norm.weight": (4,),
    "head.weight": (3, 4),
    "head.bias": (3,),
}
DECAYED = {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "head.weight"}


def make_params(seed=0, dtype=np.float64):
    r = np.random.default_rng(seed)
    return {k: r.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


def grad_sequence(n_steps, seed=1, dtype=np.float64):
    r = np.random.default_rng(seed)
    return [
        {k: r.standard_normal(s).astype(dtype) for k, s in SHAPES.items()} for _ in range(n_steps)
    ]


def on(backend, host):
    """Private copies on the backend (asarray alone would share memory with the host dict)."""
    return {k: backend.asarray(v.copy()) for k, v in host.items()}


def torch_params(host):
    return {k: torch.tensor(v, requires_grad=True) for k, v in host.items()}


def torch_groups(tp, weight_decay):
    return [
        {"params": [tp[k] for k in SHAPES if k in DECAYED], "weight_decay": weight_decay},
        {"params": [tp[k] for k in SHAPES if k not in DECAYED], "weight_decay": 0.0},
    ]


def assert_close_to_torch(backend, params, tp, rtol=1e-12):
    for k in SHAPES:
        np.testing.assert_allclose(
            backend.to_numpy(params[k]), tp[k].detach().numpy(), rtol=rtol, atol=1e-14, err_msg=k
        )


def test_default_no_decay_rule():
    params = make_params()
    got = {k for k, p in params.items() if not default_no_decay(k, p)}
    assert got == DECAYED
    x2 = np.zeros((3, 4))
    assert default_no_decay("transformer.pos_embed", x2)
    assert default_no_decay("text_embeddings.position_embeddings.weight", x2)
    assert default_no_decay("text_embeddings.token_type_embeddings.weight", x2)
    assert default_no_decay("text_embeddings.LayerNorm.weight", x2)
    assert not default_no_decay("text_embeddings.word_embeddings.weight", x2)
    opt = AdamW(make_params(), no_decay=lambda name, p: name == "head.weight")
    assert opt.no_decay_names == ["head.weight"]


@pytest.mark.oracle
def test_adamw_matches_torch(backend):
    host = make_params()
    params = on(backend, host)
    ids = {k: id(v) for k, v in params.items()}
    tp = torch_params(host)
    wd, betas, eps = 0.05, (0.9, 0.95), 1e-8
    ref = torch.optim.AdamW(torch_groups(tp, wd), lr=1e-3, betas=betas, eps=eps)
    opt = AdamW(params, lr=1e-3, betas=betas, eps=eps, weight_decay=wd)
    sched = WarmupCosine(base_lr=3e-2, total_steps=8, warmup_steps=2, min_lr=1e-3)
    for step, grads in enumerate(grad_sequence(8)):
        lr = sched(step)
        for group in ref.param_groups:
            group["lr"] = lr
        for k, g in grads.items():
            tp[k].grad = torch.tensor(g)
        ref.step()
        opt.step({k: backend.asarray(g) for k, g in grads.items()}, lr=lr)
        assert_close_to_torch(backend, params, tp)
    assert {k: id(v) for k, v in params.items()} == ids, "params must be updated in place"
    # the moments agree too
    sd = opt.state_dict()
    for k in SHAPES:
        st = ref.state[tp[k]]
        np.testing.assert_allclose(
            backend.to_numpy(sd[f"exp_avg.{k}"]), st["exp_avg"].numpy(), rtol=1e-12
        )
        np.testing.assert_allclose(
            backend.to_numpy(sd[f"exp_avg_sq.{k}"]), st["exp_avg_sq"].numpy(), rtol=1e-12
        )
    assert int(backend.to_numpy(sd["step"])) == 8


def test_adamw_leaves_params_without_grad_untouched(backend):
    """A parameter whose gradient is None gets neither the update nor the decay (as in torch)."""
    host = make_params()
    params = on(backend, host)
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    grads = {k: backend.asarray(g) for k, g in grad_sequence(1)[0].items()}
    grads["head.weight"] = None
    opt.step(grads)
    np.testing.assert_array_equal(backend.to_numpy(params["head.weight"]), host["head.weight"])
    assert not np.array_equal(backend.to_numpy(params["head.bias"]), host["head.bias"])


@pytest.mark.oracle
@pytest.mark.parametrize(
    "kw",
    [
        dict(momentum=0.9),
        dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
        dict(momentum=0.8, dampening=0.1, weight_decay=1e-2),
        dict(momentum=0.0, weight_decay=1e-2),
    ],
    ids=["momentum", "nesterov+wd", "dampening+wd", "plain+wd"],
)
def test_sgd_matches_torch(backend, kw):
    host = make_params()
    params = on(backend, host)
    tp = torch_params(host)
    wd = kw.pop("weight_decay", 0.0)
    ref = torch.optim.SGD(torch_groups(tp, wd), lr=0.1, **kw)
    opt = SGD(params, lr=0.1, weight_decay=wd, **kw)
    for grads in grad_sequence(5):
        for k, g in grads.items():
            tp[k].grad = torch.tensor(g)
        ref.step()
        opt.step({k: backend.asarray(g) for k, g in grads.items()})
        assert_close_to_torch(backend, params, tp)


@pytest.mark.oracle
@pytest.mark.parametrize(
    "make_pair",
    [
        lambda tp, params: (
            torch.optim.AdamW(torch_groups(tp, 0.05), lr=1e-2, betas=(0.9, 0.95)),
            AdamW(params, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.05),
        ),
        lambda tp, params: (
            torch.optim.SGD(torch_groups(tp, 1e-2), lr=0.1, momentum=0.8, dampening=0.3),
            SGD(params, lr=0.1, momentum=0.8, dampening=0.3, weight_decay=1e-2),
        ),
    ],
    ids=["adamw", "sgd-dampening"],
)
def test_a_parameter_that_gets_its_first_gradient_late_is_updated_as_torch_does(backend, make_pair):
    """The head has no gradient for two steps and the qkv weight misses one later: each
    parameter's own update count sets its bias correction (AdamW) and its first momentum step
    (SGD), as torch's per-parameter state does; a shared count gave other updates."""
    host = make_params()
    params = on(backend, host)
    tp = torch_params(host)
    ref, opt = make_pair(tp, params)
    head = {"head.weight", "head.bias"}
    missing = {0: head, 1: head, 3: {"blocks.0.attn.qkv.weight"}}  # step -> no gradient
    for step, grads in enumerate(grad_sequence(6)):
        grads = {k: g for k, g in grads.items() if k not in missing.get(step, ())}
        for k, t in tp.items():
            t.grad = torch.tensor(grads[k]) if k in grads else None
        ref.step()
        opt.step({k: backend.asarray(g) for k, g in grads.items()})
        assert_close_to_torch(backend, params, tp)
    state = opt.state_dict()
    counts = {k: int(backend.to_numpy(v)) for k, v in state.items() if k.startswith("step.")}
    assert counts["step.head.bias"] == 4 and counts["step.blocks.0.attn.qkv.weight"] == 5
    assert counts["step.norm.weight"] == 6 == opt.step_count


def test_a_state_without_per_parameter_counts_loads_with_the_shared_count():
    """Checkpoints written before the per-parameter counts existed still resume."""
    opt = AdamW(make_params())
    opt.step(grad_sequence(1)[0])
    old = {k: v for k, v in opt.state_dict().items() if not k.startswith("step.")}
    fresh = AdamW(make_params())
    fresh.load_state_dict(old)
    assert fresh.step_count == 1 and set(fresh.param_steps.values()) == {1}
    some = dict(old, **{"step.head.bias": np.asarray(1)})  # some counts but not all: an error
    with pytest.raises(ValueError, match="missing keys: step.blocks"):
        fresh.load_state_dict(some)


def test_float32_stays_float32(backend):
    params = on(backend, make_params(dtype=np.float32))
    grads = {k: backend.asarray(v) for k, v in grad_sequence(1, dtype=np.float32)[0].items()}
    for opt in (AdamW(params, weight_decay=0.1), SGD(params, momentum=0.9, weight_decay=0.1)):
        opt.step(grads)
        assert all(p.dtype == np.float32 for p in params.values())
        assert all(
            a.dtype == np.float32 for k, a in opt.state_dict().items() if not k.startswith("step")
        )
    clip_grad_norm(grads, 0.5)
    assert all(g.dtype == np.float32 for g in grads.values())


def test_grads_are_not_modified(backend):
    grads = {k: backend.asarray(v) for k, v in grad_sequence(1)[0].items()}
    before = {k: backend.to_numpy(g).copy() for k, g in grads.items()}
    params = on(backend, make_params())
    AdamW(params, weight_decay=0.1).step(grads)
    SGD(params, momentum=0.9, nesterov=True, weight_decay=0.1).step(grads)
    for k in grads:
        np.testing.assert_array_equal(backend.to_numpy(grads[k]), before[k])


@pytest.mark.parametrize(
    "make",
    [
        lambda p: AdamW(p, lr=1e-2, weight_decay=0.05),
        lambda p: SGD(p, lr=0.1, momentum=0.9, weight_decay=0.01),
    ],
    ids=["adamw", "sgd"],
)
def test_state_dict_round_trip_resumes_exactly(backend, make):
    """3 steps, save (through safetensors bytes), then 3 more: the same as 6 straight steps."""
    from safetensors.numpy import load, save

    seq = [{k: backend.asarray(g) for k, g in grads.items()} for grads in grad_sequence(6)]
    straight, _ = _steps(backend, make, seq)
    first, opt1 = _steps(backend, make, seq[:3])
    snapshot = opt1.state_dict()
    blob = save({k: backend.to_numpy(v) for k, v in snapshot.items()})
    resumed = on(backend, {k: backend.to_numpy(v) for k, v in first.items()})
    kept = {k: backend.to_numpy(v).copy() for k, v in snapshot.items()}
    opt1.step(seq[3])  # a snapshot is a copy: the optimizer's next step leaves it as it was
    for k, v in snapshot.items():
        np.testing.assert_array_equal(backend.to_numpy(v), kept[k], err_msg=k)
    opt2 = make(resumed)
    opt2.load_state_dict(load(blob))
    assert opt2.step_count == 3
    for grads in seq[3:]:
        opt2.step(grads)
    _assert_same(backend, resumed, straight)


def _steps(backend, make, seq):
    """Fresh parameters and their optimizer ``make(params)`` after a step for each of ``seq``."""
    params = on(backend, make_params())
    opt = make(params)
    for grads in seq:
        opt.step(grads)
    return params, opt


def _assert_same(backend, got, want):
    for k in SHAPES:
        np.testing.assert_array_equal(
            backend.to_numpy(got[k]), backend.to_numpy(want[k]), err_msg=k
        )


def test_resuming_keeps_each_parameters_own_step_count(backend):
    """The head gets no gradient at the first step, so after it its own count is 0 while the
    others' is 1. Saved then and loaded into a fresh AdamW, that count must come back with the
    state: 3 more steps give exactly the parameters of 4 uninterrupted steps (a count reset to
    the optimizer's step would change the head's bias correction)."""
    head = {"head.weight", "head.bias"}
    seq = [{k: backend.asarray(g) for k, g in grads.items()} for grads in grad_sequence(4)]
    seq[0] = {k: g for k, g in seq[0].items() if k not in head}

    def make(p):
        return AdamW(p, lr=1e-2, weight_decay=0.05)

    straight, _ = _steps(backend, make, seq)
    first, opt1 = _steps(backend, make, seq[:1])
    state = {k: backend.to_numpy(v).copy() for k, v in opt1.state_dict().items()}
    assert int(state["step.head.bias"]) == 0 and int(state["step.norm.weight"]) == 1
    resumed = on(backend, {k: backend.to_numpy(v) for k, v in first.items()})
    opt2 = make(resumed)
    opt2.load_state_dict(state)
    for grads in seq[1:]:
        opt2.step(grads)
    _assert_same(backend, resumed, straight)


def test_load_state_dict_names_every_bad_key():
    opt = AdamW(make_params())
    sd = {k: v for k, v in opt.state_dict().items() if k != "exp_avg.head.bias"}
    sd["exp_avg_sq.head.weight"] = np.zeros((2, 2))
    sd["bogus"] = np.zeros(1)
    with pytest.raises(ValueError) as err:
        opt.load_state_dict(sd)
    msg = str(err.value)
    assert "exp_avg.head.bias" in msg and "bogus" in msg and "exp_avg_sq.head.weight" in msg


def test_bad_grads_raise():
    opt = AdamW(make_params())
    grads = grad_sequence(1)[0]
    grads["head.weight"] = np.zeros((4, 3))
    with pytest.raises(ValueError, match="head.weight"):
        opt.step(grads)
    with pytest.raises(KeyError, match=r"nope .*frozen, takes their gradients alone"):
        opt.step({"nope": np.zeros(3)})
    with pytest.raises(TypeError, match="head.bias"):
        opt.step({"head.bias": np.zeros(3, dtype=np.float32)})


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: AdamW(p, lr=NAN), ValueError, "lr must be a finite number"),
        (lambda p: AdamW(p, lr=-1e-3), ValueError, "lr must be a finite number >= 0"),
        (lambda p: AdamW(p, lr=INF), ValueError, "lr must be a finite number"),
        (lambda p: AdamW(p, eps=NAN), ValueError, "eps must be a finite number"),
        (lambda p: AdamW(p, weight_decay=NAN), ValueError, "weight_decay must be a finite"),
        (lambda p: AdamW(p, betas=(0.9, NAN)), ValueError, r"betas\[1\] must be a finite"),
        (
            lambda p: AdamW(p, betas=(1.0, 0.9)),
            ValueError,
            r"betas\[0\] must be a finite number in \[0, 1\)",
        ),
        (lambda p: AdamW(p, betas=(0.9,)), ValueError, r"betas must be a pair.*\(0\.9,\)"),
        (lambda p: AdamW(p, betas=0.9), TypeError, "betas must be a pair"),
        (lambda p: AdamW(p, lr="0.1"), TypeError, "lr must be a number, got str"),
        (lambda p: AdamW(p, lr=True), TypeError, "lr must be a number, got bool"),
        (lambda p: AdamW(p, no_decay=True), TypeError, "no_decay must be a function"),
        (lambda p: SGD(p, momentum=NAN), ValueError, "momentum must be a finite number"),
        (
            lambda p: SGD(p, momentum=0.9, dampening=-0.1),
            ValueError,
            "dampening must be a finite number >= 0",
        ),
        (lambda p: SGD(p, momentum=0.9, dampening=NAN), ValueError, "dampening must be a finite"),
        (lambda p: SGD(p, nesterov="yes"), TypeError, "nesterov must be a bool, got str"),
        (lambda p: SGD(p, lr=NAN), ValueError, "lr must be a finite number"),
        (
            lambda p: SGD(p, weight_decay=-1.0),
            ValueError,
            "weight_decay must be a finite number >= 0",
        ),
    ],
)
def test_bad_hyperparameters_are_refused(make, error, match):
    with pytest.raises(error, match=match):
        make(make_params())


@pytest.mark.parametrize("cls", [AdamW, SGD])
def test_step_checks_its_lr_and_grads(cls):
    """step's lr was never checked (lr=-1 ascended the gradient, NaN made every parameter NaN);
    a list of grads gave "unhashable type". A refused step changes nothing."""
    params = make_params()
    before = {k: v.copy() for k, v in params.items()}
    opt = cls(params, lr=0.1)
    grads = grad_sequence(1)[0]
    for lr, error in ((-1.0, ValueError), (NAN, ValueError), (INF, ValueError), ("0.1", TypeError)):
        with pytest.raises(error, match="lr must be"):
            opt.step(grads, lr=lr)
    with pytest.raises(TypeError, match="grads must be a dict of name -> array"):
        opt.step(list(grads.values()))
    with pytest.raises(TypeError, match=r"grads\['head.bias'\] must be an array"):
        opt.step({"head.bias": [0.0, 0.0, 0.0]})
    assert opt.step_count == 0 and opt.lr == 0.1
    assert all(np.array_equal(params[k], before[k]) for k in params)
    # NumPy numbers are numbers
    opt.step(grads, lr=np.float32(0.05))
    assert opt.lr == pytest.approx(0.05) and type(opt.lr) is float
    cls(make_params(), lr=np.float64(1e-3), weight_decay=np.int64(0))


def test_adamw_takes_numpy_numbers_everywhere():
    opt = AdamW(make_params(), lr=np.float32(1e-3), betas=np.array([0.9, 0.99]),
                eps=np.float64(1e-8), weight_decay=np.float32(0.05))  # fmt: skip
    assert opt.betas == (0.9, 0.99) and all(type(b) is float for b in opt.betas)


def test_a_step_on_empty_grads_warns_and_the_loop_goes_on():
    """model.zero_grads() empties model.grads (torch's set_to_none): a step on it updates
    nothing, as torch's does when every .grad is None, and says so; it does not raise, so a
    loop that calls zero_grads after its step keeps working."""
    from minivit.models import ViT

    m = ViT(img_size=4, patch_size=2, in_chans=1, num_classes=2, embed_dim=8, depth=1,
            num_heads=2, dtype="float64")  # fmt: skip
    opt = AdamW(m.params, lr=1e-2)
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4))
    for _ in range(2):  # the training loop's order: forward, backward, step, zero_grads
        m.forward(x)
        m.backward(np.ones((2, 2)))
        assert set(m.grads) == set(m.params)
        opt.step(m.grads)
        m.zero_grads()
        assert m.grads == {}
    before = m.state_dict()
    with pytest.warns(RuntimeWarning, match="empty grads dict: no parameter is updated"):
        opt.step(m.grads)
    assert all(np.array_equal(m.params[k], v) for k, v in before.items())
    assert all(n == 2 for n in opt.param_steps.values())


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def test_schedule_key_steps():
    s = WarmupCosine(base_lr=1.0, total_steps=110, warmup_steps=10, min_lr=0.1)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.5, rel=1e-15)
    assert s(10) == pytest.approx(1.0, rel=1e-15)  # the peak, right after warmup
    assert s(60) == pytest.approx(0.55, rel=1e-15)  # halfway down: (base + min) / 2
    assert s(110) == pytest.approx(0.1, rel=1e-15)
    assert s(500) == pytest.approx(0.1, rel=1e-15)  # stays at min_lr past the end
    values = [s(i) for i in range(111)]
    assert all(a <= b for a, b in zip(values[:10], values[1:11]))
    assert all(a >= b for a, b in zip(values[10:-1], values[11:]))
    assert warmup_cosine_lr(0, base_lr=2.0, total_steps=4) == 2.0  # no warmup: starts at base
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(1.0, total_steps=5, warmup_steps=6)


@pytest.mark.oracle
def test_schedule_matches_transformers():
    from transformers import get_cosine_schedule_with_warmup

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=40)
    ours = WarmupCosine(base_lr=0.3, total_steps=40, warmup_steps=7)
    for step in range(40):
        assert ours(step) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-13, abs=1e-16)
        opt.step()
        ref.step()


# --------------------------------------------------------------------------------------------
# Clipping
# --------------------------------------------------------------------------------------------


@pytest.mark.oracle
@pytest.mark.parametrize("max_norm", [0.5, 1e3])  # clips / leaves alone
@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_clip_grad_norm_matches_torch(backend, max_norm, norm_type):
    host = grad_sequence(1)[0]
    grads = on(backend, host)
    grads["head.bias"] = None  # a parameter without a gradient is skipped
    tensors = []
    for k, v in host.items():
        if k == "head.bias":
            continue
        t = torch.zeros(v.shape, dtype=torch.float64, requires_grad=True)
        t.grad = torch.tensor(v)
        tensors.append(t)
    ref = torch.nn.utils.clip_grad_norm_(tensors, max_norm, norm_type=norm_type)
    norm = clip_grad_norm(grads, max_norm, norm_type=norm_type)
    assert float(norm) == pytest.approx(float(ref), rel=1e-13)
    got = [backend.to_numpy(g) for k, g in grads.items() if g is not None]
    for a, t in zip(got, tensors):
        np.testing.assert_allclose(a, t.grad.numpy(), rtol=1e-13)
    after = float(global_grad_norm(grads, norm_type))
    assert after <= max_norm * (1 + 1e-12) or max_norm > float(ref)


def test_sgd_takes_what_torch_takes():
    """A NumPy bool for nesterov and a dampening above 1 (torch bounds neither) were refused."""
    p = {"w": np.ones(3)}
    assert SGD(p, lr=0.1, momentum=0.9, nesterov=np.True_).nesterov is True
    SGD(p, lr=0.1, momentum=0.9, dampening=1.5)
