"""minivit.gradcheck and `minivit gradcheck`: right backwards pass, wrong ones are caught.

Budget: < 30 s (the full CLI run is about 2 s).
"""

from __future__ import annotations

import numpy as np
import pytest

from minivit import gradcheck as gc
from minivit import gradcheck_cli, ops
from minivit.cli import main


def linear_inputs(backend, rng):
    return (
        backend.asarray(rng.standard_normal((2, 3, 4))),
        backend.asarray(rng.standard_normal((5, 4))),
        backend.asarray(rng.standard_normal(5)),
    )


def corrupt(backward, slot, index, factor=1.001):
    """A backward whose grads[slot] is wrong by a factor at one entry (the rest is right)."""

    def wrong(dout, cache):
        grads = list(backward(dout, cache))
        g = grads[slot].copy()
        g[index] *= factor
        grads[slot] = g
        return tuple(grads)

    return wrong


# --------------------------------------------------------------------------------------------
# The library
# --------------------------------------------------------------------------------------------


def test_numerical_grad_matches_a_known_gradient(backend, rng):
    x = backend.asarray(rng.standard_normal((3, 4)))
    w = backend.asarray(rng.standard_normal((3, 4)))
    before = backend.to_numpy(x).copy()

    def f(x, w):  # d/dx sum(sin(x) w) = cos(x) w
        return float((backend.xp.sin(x) * w).sum())

    num = gc.numerical_grad(f, (x, w), 0)
    assert type(num) is type(x) and num.dtype == np.float64 and num.shape == x.shape
    exact = np.cos(before) * backend.to_numpy(w)
    np.testing.assert_allclose(backend.to_numpy(num), exact, rtol=1e-8, atol=1e-9)
    np.testing.assert_array_equal(backend.to_numpy(x), before)  # the caller's x is untouched


def test_numerical_grad_divides_by_the_step_as_stored():
    """x +- eps rounds at 1e6 (spacing 1.2e-10): dividing by the stored distance, not 2 eps,
    gives the slope of f = x0 + x1 exactly; 2 eps is off by about 7.6e-6."""
    x = np.array([1e6 + 0.3, -2e5 + 0.1])
    num = gc.numerical_grad(lambda x: float(x[0] + x[1]), (x,), 0)
    np.testing.assert_array_equal(num, [1.0, 1.0])


def test_directional_check_runs_every_direction(backend, rng):
    """One forward for the gradients, then two per direction and input: with n_directions=4
    and three inputs, 1 + 3 * 2 * 4 calls, each along its own direction."""
    calls = []

    def counted(x, w, b):
        calls.append(backend.to_numpy(x).copy())
        return ops.linear_forward(x, w, b)

    inputs = linear_inputs(backend, rng)
    rep = gc.check_backward(counted, ops.linear_backward, inputs, n_directions=4).assert_ok()
    assert len(calls) == 1 + 3 * 2 * 4
    assert [r.n_compared for r in rep.rows] == [4, 4, 4]
    steps = [c - calls[0] for c in calls[1:9]]  # x's 4 pairs: +v, -v for 4 directions
    assert len({tuple(np.round(s.ravel(), 15)) for s in steps[::2]}) == 4


@pytest.mark.parametrize("check", [gc.check_backward, gc.check_backward_full, gc.check_jacobian])
def test_right_backward_passes(backend, rng, check):
    rep = check(ops.linear_forward, ops.linear_backward, linear_inputs(backend, rng))
    rep.assert_ok()
    assert [r.name for r in rep.rows] == ["x", "w", "b"]  # names from the forward's signature
    assert rep.max_rel_err < 1e-7


@pytest.mark.parametrize("check", [gc.check_backward, gc.check_backward_full, gc.check_jacobian])
def test_wrong_backward_fails_and_names_the_input(backend, rng, check):
    wrong = corrupt(ops.linear_backward, 1, (2, 1), factor=1.001)  # dw[2, 1] off by 0.1 %
    rep = check(ops.linear_forward, wrong, linear_inputs(backend, rng))
    assert not rep.passed
    assert [r.passed for r in rep.rows] == [True, False, True]
    with pytest.raises(AssertionError, match="FAIL"):
        rep.assert_ok()


def test_joint_direction_row(backend, rng):
    """joint=True adds Chainer's all-inputs-at-once direction, which also sees the error."""
    inputs = linear_inputs(backend, rng)
    rep = gc.check_backward(ops.linear_forward, ops.linear_backward, inputs, joint=True)
    rep.assert_ok()
    assert rep.rows[-1].name == "(all inputs)" and rep.rows[-1].shape == (24 + 20 + 5,)
    wrong = corrupt(ops.linear_backward, 0, (0, 0, 0), factor=1.01)
    rep = gc.check_backward(ops.linear_forward, wrong, inputs, joint=True)
    assert [r.passed for r in rep.rows] == [False, True, True, False]


def test_joint_direction_row_with_two_inputs(backend, rng):
    """The joint row is there as soon as two inputs are checked (linear without its bias)."""
    x, w, _ = linear_inputs(backend, rng)
    rep = gc.check_backward(ops.linear_forward, ops.linear_backward, (x, w, None), joint=True)
    rep.assert_ok()
    assert [r.name for r in rep.rows] == ["x", "w", "(all inputs)"]
    assert rep.rows[-1].shape == (24 + 20,)


def test_elementwise_check_points_at_the_wrong_entry(backend, rng):
    wrong = corrupt(ops.linear_backward, 1, (2, 1), factor=1.01)
    rep = gc.check_backward_full(ops.linear_forward, wrong, linear_inputs(backend, rng))
    row = rep.rows[1]
    assert row.worst == "(2, 1)"
    assert row.max_rel_err == pytest.approx(0.01, rel=0.05)


def test_jacobian_assembled_from_backward_is_the_softmax_jacobian(backend, rng):
    x = backend.asarray(rng.standard_normal(5))
    ja = gc.analytic_jacobian(ops.softmax_forward, ops.softmax_backward, (x,), 0)
    s = np.exp(backend.to_numpy(x))
    s /= s.sum()
    np.testing.assert_allclose(ja, np.diag(s) - np.outer(s, s), atol=1e-15)
    jn = gc.numerical_jacobian(lambda x: ops.softmax_forward(x)[0], (x,), 0)
    np.testing.assert_allclose(jn, ja, atol=1e-9)
    gc.check_jacobian(ops.softmax_forward, ops.softmax_backward, (x,)).assert_ok()


def test_analytic_jacobian_finds_the_slot_after_an_integer_input(backend, rng):
    """embedding(ids, table): ids take no slot, so the table's gradient is grads[0]."""
    ids = backend.asarray(np.array([[0, 2], [2, 1]]))
    table = backend.asarray(rng.standard_normal((3, 2)))
    ja = gc.analytic_jacobian(ops.embedding_forward, ops.embedding_backward, (ids, table), 1)
    jn = gc.numerical_jacobian(lambda i, t: ops.embedding_forward(i, t)[0], (ids, table), 1)
    assert ja.shape == (8, 6)
    np.testing.assert_allclose(ja, jn, atol=1e-9)


def test_random_dout_catches_what_dout_ones_cannot(backend, rng):
    """Softmax's gradient for dout = ones is exactly zero, so a zero backward would pass."""
    x = backend.asarray(rng.standard_normal((2, 5)))

    def zero_backward(dout, cache):
        return (backend.xp.zeros_like(dout),)

    ones = backend.xp.ones((2, 5))
    assert gc.check_backward(ops.softmax_forward, zero_backward, (x,), dout=ones).passed
    assert not gc.check_backward(ops.softmax_forward, zero_backward, (x,)).passed


def test_grad_slots_follow_the_api_convention():
    x, w, b = np.zeros((1, 2, 4)), np.zeros((12, 4)), np.zeros(12)
    mask = np.ones((1, 2), dtype=bool)
    # attention(x, w_qkv, b_qkv=None, w_proj, b_proj, num_heads, key_mask)
    assert gc.grad_slots((x, w, None, np.zeros((4, 4)), b[:4], 2, mask)) == {0: 0, 1: 1, 3: 3, 4: 4}
    # embedding(ids, table); cross_entropy(logits, targets)
    assert gc.grad_slots((np.zeros(3, dtype=np.int64), w)) == {1: 0}
    assert gc.grad_slots((w, np.zeros(12, dtype=np.int64))) == {0: 0}


def test_attention_options_check_with_defaults(backend, rng):
    B, N, D, H = 2, 3, 4, 2
    inputs = (
        backend.asarray(rng.standard_normal((B, N, D))),
        backend.asarray(rng.standard_normal((3 * D, D))),
        None,
        backend.asarray(rng.standard_normal((D, D))),
        backend.asarray(rng.standard_normal(D)),
        H,
        backend.asarray(np.array([[True, False, False], [True, True, False]])),
    )
    rep = gc.check_backward(ops.attention_forward, ops.attention_backward, inputs).assert_ok()
    assert [r.name for r in rep.rows] == ["x", "w_qkv", "w_proj", "b_proj"]


def test_missing_or_misshaped_grads_fail_with_a_note(backend, rng):
    inputs = linear_inputs(backend, rng)

    def no_db(dout, cache):
        dx, dw, _ = ops.linear_backward(dout, cache)
        return dx, dw.T, None

    rep = gc.check_backward(ops.linear_forward, no_db, inputs)
    assert [r.passed for r in rep.rows] == [True, False, False]
    assert "shape" in rep.rows[1].note and "None" in rep.rows[2].note
    text = str(rep)
    assert "backward gave None" in text


@pytest.mark.parametrize("check", [gc.check_backward, gc.check_backward_full, gc.check_jacobian])
def test_a_gradient_of_another_dtype_fails_with_a_note(backend, rng, check):
    """A float32 gradient for a float64 input is a wrong backward, even where its values would
    pass: the row fails and its note names both dtypes."""

    def float32_dw(dout, cache):
        dx, dw, db = ops.linear_backward(dout, cache)
        return dx, dw.astype(backend.xp.float32), db

    rep = check(ops.linear_forward, float32_dw, linear_inputs(backend, rng))
    assert [r.passed for r in rep.rows] == [True, False, True]
    assert rep.rows[1].note == "grad dtype float32 != input dtype float64"


def test_mutating_forward_or_backward_fails(backend, rng):
    inputs = linear_inputs(backend, rng)

    def scribbling_backward(dout, cache):
        grads = ops.linear_backward(dout, cache)
        dout *= 2
        return grads

    rep = gc.check_backward(ops.linear_forward, scribbling_backward, inputs)
    assert not rep.passed and any(r.name == "dout" and "modified" in r.note for r in rep.rows)

    def scribbling_forward(x, w, b):
        out = ops.linear_forward(x, w, b)
        b += 0.0 * b + 1e-3
        return out

    rep = gc.check_backward(scribbling_forward, ops.linear_backward, inputs)
    assert "forward modified this input" in str(rep) and not rep.passed

    def input_scribbling_backward(dout, cache):  # writes into w through the cache
        grads = ops.linear_backward(dout, cache)
        cache.w[...] += 1e-3
        return grads

    rep = gc.check_backward(ops.linear_forward, input_scribbling_backward, inputs)
    assert not rep.passed
    assert "backward modified this input" in str(rep)  # blamed on the pass that did it
    assert "forward modified" not in str(rep)


def test_report_format():
    rows = [
        gc.GradcheckRow("x", (2, 3), 1e-9, 2e-8, True, 1e-7, 6, "dir 0"),
        gc.GradcheckRow("w", (4,), 3e-3, 1e-3, False, 1e-7, 4, "(1,)"),
    ]
    rep = gc.GradcheckReport("elementwise", rows, rtol=1e-6, title="toy")
    text = str(rep)
    lines = text.splitlines()
    assert lines[0] == "elementwise gradient check of toy (rtol=1e-06): FAIL"
    assert lines[1].split() == ["input", "shape", "max", "abs", "err", "max", "rel", "err"] + [
        "atol",
        "worst",
        "at",
        "result",
    ]
    assert "2x3" in lines[3] and "2.00e-08" in lines[3] and lines[3].rstrip().endswith("ok")
    assert lines[4].rstrip().endswith("FAIL") and "1.00e-03" in lines[4]
    assert not rep.passed and rep.max_rel_err == 1e-3 and rep.worst_row().name == "w"
    with pytest.raises(AssertionError) as err:
        rep.assert_ok()
    assert text in str(err.value)
    rows[1].passed = True
    assert rep.passed and rep.assert_ok() is rep
    assert not gc.GradcheckReport("directional").passed  # nothing checked is not a pass


def test_relative_error_definition():
    # |a - n| / max(|a|, |n|, atol / rtol): relative for large values, absolute for tiny ones.
    ae, re, k = gc._compare([1.0, 2.0], [1.0, 2.002], rtol=1e-6, atol=1e-12)
    assert k == 1 and ae == pytest.approx(0.002) and re == pytest.approx(0.002 / 2.002)
    ae, re, _ = gc._compare([1e-12], [3e-12], rtol=1e-6, atol=1e-9)
    assert re == pytest.approx(2e-12 / 1e-3)  # below the floor: compared against atol
    _, re, _ = gc._compare([np.nan], [1.0], rtol=1e-6, atol=1e-9)
    assert re == np.inf


def test_the_worst_entry_is_the_largest_relative_error():
    """The worst entry is chosen by relative error: 0.5 off 1e6 is 5e-7, 0.001 off 1 is 1e-3."""
    ae, re, k = gc._compare([1e6, 1.0], [1e6 + 0.5, 1.001], rtol=1e-6, atol=1e-12)
    assert k == 1 and re == pytest.approx(0.001 / 1.001)
    assert ae == 0.5  # the largest absolute error is reported as such, wherever it is


# --------------------------------------------------------------------------------------------
# Whole model
# --------------------------------------------------------------------------------------------


def tiny_model(backend, rng):
    """linear -> gelu -> linear -> cross-entropy, with its hand-written backward."""
    params = {
        "fc1.weight": backend.asarray(rng.standard_normal((6, 4)) * 0.5),
        "fc1.bias": backend.asarray(rng.standard_normal(6) * 0.1),
        "fc2.weight": backend.asarray(rng.standard_normal((3, 6)) * 0.5),
        "fc2.bias": backend.asarray(rng.standard_normal(3) * 0.1),
    }
    x = backend.asarray(rng.standard_normal((5, 4)))
    t = backend.asarray(rng.integers(0, 3, 5))

    def loss_and_grads():
        h, c1 = ops.linear_forward(x, params["fc1.weight"], params["fc1.bias"])
        a, c2 = ops.gelu_forward(h)
        z, c3 = ops.linear_forward(a, params["fc2.weight"], params["fc2.bias"])
        loss, c4 = ops.cross_entropy_forward(z, t)
        (dz,) = ops.cross_entropy_backward(backend.xp.ones_like(loss), c4)
        da, dw2, db2 = ops.linear_backward(dz, c3)
        (dh,) = ops.gelu_backward(da, c2)
        _, dw1, db1 = ops.linear_backward(dh, c1)
        grads = {"fc1.weight": dw1, "fc1.bias": db1, "fc2.weight": dw2, "fc2.bias": db2}
        return loss, grads

    return params, loss_and_grads


def test_model_directional_check(backend, rng):
    params, loss_and_grads = tiny_model(backend, rng)
    ids = {k: id(v) for k, v in params.items()}
    before = {k: backend.to_numpy(v).copy() for k, v in params.items()}
    _, grads = loss_and_grads()

    def loss_fn():
        return loss_and_grads()[0]

    gc.check_model_directional(loss_fn, params, grads).assert_ok()
    rep = gc.check_model_directional(loss_fn, params, grads, per_parameter=True).assert_ok()
    assert [r.name for r in rep.rows] == list(params)

    bad = dict(grads)
    bad["fc2.bias"] = grads["fc2.bias"] * 1.01
    assert not gc.check_model_directional(loss_fn, params, bad).passed
    rep = gc.check_model_directional(loss_fn, params, bad, per_parameter=True)
    assert [r.name for r in rep.rows if not r.passed] == ["fc2.bias"]

    # perturbed in place and restored exactly: same objects, same bits
    assert {k: id(v) for k, v in params.items()} == ids
    for k in params:
        np.testing.assert_array_equal(backend.to_numpy(params[k]), before[k])


def test_model_check_sees_a_gradient_off_by_1e_4(backend, rng):
    """The model check's noise floor (256 unit roundoffs of the loss, over eps) is far below
    a 1e-4 relative error in one parameter's gradient: that parameter's row fails."""
    params, loss_and_grads = tiny_model(backend, rng)
    _, grads = loss_and_grads()

    def loss_fn():
        return loss_and_grads()[0]

    gc.check_model_directional(loss_fn, params, grads, per_parameter=True).assert_ok()
    bad = {**grads, "fc1.weight": grads["fc1.weight"] * (1 + 1e-4)}
    rep = gc.check_model_directional(loss_fn, params, bad, per_parameter=True)
    assert [r.name for r in rep.rows if not r.passed] == ["fc1.weight"]


def test_a_parameter_without_a_gradient_fails_the_model_check(backend, rng):
    """A backward that forgets a parameter (its gradient absent or None) fails: a direction
    over the other parameters alone would pass. Leaving it out of ``names`` is the way to skip
    a parameter on purpose."""
    params, loss_and_grads = tiny_model(backend, rng)
    _, grads = loss_and_grads()

    def loss_fn():
        return loss_and_grads()[0]

    for forgotten in ({k: g for k, g in grads.items() if k != "fc1.weight"},
                      {**grads, "fc1.weight": None}):  # fmt: skip
        for per_parameter in (False, True):
            rep = gc.check_model_directional(
                loss_fn, params, forgotten, per_parameter=per_parameter
            )
            assert not rep.passed
            (row,) = [r for r in rep.rows if not r.passed]
            assert row.name == "fc1.weight" and row.note == "no gradient"
            assert len(rep.rows) == (len(params) if per_parameter else 2)
    names = [k for k in params if k != "fc1.weight"]
    gc.check_model_directional(loss_fn, params, forgotten, names=names).assert_ok()
    with pytest.raises(KeyError, match="no parameter named: fc9"):
        gc.check_model_directional(loss_fn, params, grads, names=["fc9"])


def test_model_check_restores_params_when_the_loss_raises(backend, rng):
    params, loss_and_grads = tiny_model(backend, rng)
    before = {k: backend.to_numpy(v).copy() for k, v in params.items()}
    _, grads = loss_and_grads()
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return loss_and_grads()[0]

    with pytest.raises(RuntimeError, match="boom"):
        gc.check_model_directional(flaky, params, grads)
    for k in params:
        np.testing.assert_array_equal(backend.to_numpy(params[k]), before[k])


# --------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------


def test_cli_passes_on_every_op(capsys, backend):
    assert main(["gradcheck", "--backend", backend.name]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if line.startswith("op "))
    assert header.split() == ["op", "shapes", "directional", "elementwise", "max", "rel", "err"] + [
        "result"
    ]
    for name in ("linear", "gelu (tanh)", "attention (one valid key)", "dropout (train, p=0.3)"):
        assert any(
            line.startswith(name + " ") and line.endswith("pass") for line in out.splitlines()
        )
    assert "cross_entropy (ignore_index)" in out
    assert "FAIL" not in out and "WARNING" not in out


def test_every_op_has_a_case(backend):
    assert gradcheck_cli.uncovered_ops(gradcheck_cli.build_cases(backend)) == []


def test_cli_fails_on_a_broken_op(monkeypatch, capsys):
    monkeypatch.setattr(ops, "gelu_backward", corrupt(ops.gelu_backward, 0, (0, 0), 1.01))
    assert main(["gradcheck", "--backend", "numpy", "--ops", "gelu", "softmax"]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("gelu (none)") and line.endswith("FAIL") for line in lines)
    assert any(line.startswith("softmax ") and line.endswith("pass") for line in lines)
    assert "FAILED: gelu (none), gelu (tanh)" in out
    assert "elementwise gradient check of gelu (none)" in out  # the per-input table follows


def test_cli_sees_the_cosine_clamp_and_sinkhorn_padding(monkeypatch, capsys):
    """Two branches that random inputs never reach have cases of their own: a row of x below
    the norm's clamp (a backward that projects it as if it were above fails), and padded
    marginals (a backward that goes wrong only when a marginal has a zero entry fails)."""
    cosine_backward, sinkhorn_backward = ops.cosine_cost_backward, ops.sinkhorn_backward

    def projects_every_row(dout, cache):
        cache.x_free = cache.x_free | True
        return cosine_backward(dout, cache)

    def wrong_with_padding(dplan, cache):
        dcost, da, db = sinkhorn_backward(dplan, cache)
        return (dcost * 1.01 if (cache.b == 0).any() else dcost), da, db

    monkeypatch.setattr(ops, "cosine_cost_backward", projects_every_row)
    monkeypatch.setattr(ops, "sinkhorn_backward", wrong_with_padding)
    assert main(["gradcheck", "--backend", "numpy", "--ops", "cosine_cost", "sinkhorn"]) == 1
    lines = capsys.readouterr().out.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("op "))) + 2 :]
    failed = [row.split("  ")[0] for row in table[: table.index("")] if row.endswith("FAIL")]
    assert failed == ["cosine_cost (a row below the norm's clamp)", "sinkhorn (padded marginals)"]


def test_a_family_takes_every_case_named_after_it(capsys):
    """--ops sinkhorn takes the implicit-backward case too (its name starts "sinkhorn ("), as
    --help says; --ops sinkhorn_implicit takes that case alone."""
    assert main(["gradcheck", "--backend", "numpy", "--list", "--ops", "sinkhorn"]) == 0
    names = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines() if line]
    assert names == [
        "sinkhorn (uniform marginals)",
        "sinkhorn (given marginals)",
        "sinkhorn (padded marginals)",
        "sinkhorn (implicit backward, converged)",
    ]
    assert main(["gradcheck", "--backend", "numpy", "--list", "--ops", "sinkhorn_implicit"]) == 0
    names = [line.split("  ")[0] for line in capsys.readouterr().out.splitlines() if line]
    assert names == ["sinkhorn (implicit backward, converged)"]


def test_cli_reports_a_crashing_op(monkeypatch, capsys):
    def crash(dout, cache):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(ops, "tanh_backward", crash)
    assert main(["gradcheck", "--backend", "numpy", "--ops", "tanh"]) == 1
    out = capsys.readouterr().out
    assert "ERROR" in out and "RuntimeError: kaboom" in out


def test_cli_unknown_op(capsys):
    assert main(["gradcheck", "--backend", "numpy", "--ops", "nonsense", "gelu", "bad"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # nothing checked
    (line,) = err.strip().splitlines()
    assert line.startswith("minivit: error: unknown op(s) for --ops: nonsense, bad; known ops: ")
    assert "gelu" in line and "attention" in line


@pytest.mark.parametrize(
    "option, value",
    [
        ("--directions", "0"),
        ("--directions", "-2"),
        ("--eps", "0"),
        ("--eps", "-0.5"),
        ("--eps", "nan"),
        ("--rtol", "0"),
        ("--rtol", "inf"),
        ("--seed", "-1"),
    ],
)
def test_cli_refuses_options_out_of_range(capsys, option, value):
    """A step or tolerance of 0 used to fail every op with ZeroDivisionError, and no directions
    passed with nothing checked."""
    with pytest.raises(SystemExit) as e:
        main(["gradcheck", "--backend", "numpy", "--ops", "gelu", "--no-full", option, value])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and f"error: argument {option}: must be " in err and value in err


def test_cli_takes_options_in_range(capsys):
    argv = ["--ops", "gelu", "--no-full", "--directions", "1", "--eps", "1e-5", "--rtol", "1e-5"]
    assert main(["gradcheck", "--backend", "numpy", *argv, "--seed", "0"]) == 0
    assert "2/2 cases passed" in capsys.readouterr().out


def _negated_dw(dout, cache):
    """linear's backward with a sign error in the weight's gradient."""
    dx, dw, db = ops.linear_backward(dout, cache)
    return dx, -dw, db


@pytest.mark.parametrize("check", ["check_backward", "check_backward_full"])
def test_float32_inputs_get_a_step_they_can_resolve(check):
    """With float32 inputs and the float64 step (1e-6), the noise floor reached 72 and a sign
    error in dw passed. The defaults now follow the dtype, and the error is caught."""
    rng = np.random.default_rng(0)
    x, w, b = (rng.standard_normal(s).astype(np.float32) for s in ((4, 6), (5, 6), (5,)))
    fn = getattr(gc, check)
    wrong = fn(ops.linear_forward, _negated_dw, (x, w, b))
    assert wrong.rtol == gc.DEFAULTS["float32"]["rtol"]
    assert [r.passed for r in wrong.rows] == [True, False, True]  # x, w, b: w is named
    assert fn(ops.linear_forward, ops.linear_backward, (x, w, b)).passed
    with pytest.raises(ValueError, match=r"eps=1e-06 is below what float32 inputs can resolve"):
        fn(ops.linear_forward, _negated_dw, (x, w, b), eps=1e-6)
    # float64 keeps its own defaults
    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))
    assert fn(ops.linear_forward, ops.linear_backward, (x64, w64, b64)).rtol == 1e-6


def test_step_and_rtol_rules():
    assert gc.step_and_rtol([np.float64]) == (1e-6, 1e-6)
    assert gc.step_and_rtol([np.float64, np.float32]) == (3e-3, 2e-2)  # the least precise
    assert gc.step_and_rtol([np.float64], eps=1e-7, rtol=1e-5) == (1e-7, 1e-5)
    with pytest.raises(ValueError, match="below what float64 inputs can resolve"):
        gc.step_and_rtol([np.float64], eps=1e-9)
    with pytest.raises(ValueError, match="rtol must be a finite number above 0"):
        gc.step_and_rtol([np.float64], rtol=0.0)


def test_cli_refuses_a_step_the_dtype_cannot_resolve(capsys):
    """It parsed, then listed every case as FAILED with the library's refusal."""
    argv = ["gradcheck", "--backend", "numpy", "--ops", "gelu", "--no-full", "--dtype", "float32"]
    assert main([*argv, "--eps", "1e-5"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("minivit: error: eps=1e-05 is below what float32 inputs can resolve")


def test_a_case_passes_only_when_both_checks_pass_and_nothing_raised():
    """The table's pass/fail: a case fails when either check fails, or when a check raised
    (even after the directional check passed); a skipped case is not a failure."""
    from types import SimpleNamespace as NS

    case = gradcheck_cli.Case("c", "c", None, None, ())
    ok, bad = NS(passed=True, max_rel_err=1e-9), NS(passed=False, max_rel_err=1e-2)
    Result = gradcheck_cli.CaseResult
    assert Result(case, directional=ok, full=ok).passed
    assert Result(case, directional=ok, full=None).passed  # --no-full
    assert not Result(case, directional=ok, full=bad).passed
    assert not Result(case, directional=bad, full=ok).passed
    assert not Result(case, directional=bad, full=None).passed
    assert not Result(case, directional=ok, error="RuntimeError: boom").passed
    assert not Result(case).passed  # nothing ran
    assert Result(gradcheck_cli.Case("c", "c", None, None, (), skip="why")).passed
    assert Result(case, directional=ok, full=bad).max_rel_err == 1e-2


def test_cli_hands_its_options_to_each_check_and_shows_the_larger_error(monkeypatch, capsys):
    """--directions, --seed, --eps and --rtol reach the checks, --no-full skips the elementwise
    one (its column then shows "-"), and the max rel err column is the larger of the two."""
    from types import SimpleNamespace as NS

    calls = []

    def fake(method, err):
        def check(forward, backward, inputs, **kw):
            calls.append((method, kw))
            return NS(passed=True, max_rel_err=err)

        return check

    monkeypatch.setattr(gc, "check_backward", fake("directional", 1e-9))
    monkeypatch.setattr(gc, "check_backward_full", fake("full", 3e-7))
    argv = ["gradcheck", "--backend", "numpy", "--ops", "gelu (tanh)", "--seed", "4"]
    assert main([*argv, "--directions", "2", "--eps", "1e-5", "--rtol", "1e-4"]) == 0
    (row,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("gelu (tanh)")]
    assert row.split()[-4:] == ["1.0e-09", "3.0e-07", "3.0e-07", "pass"]
    assert [m for m, _ in calls] == ["directional", "full"]
    assert calls[0][1]["n_directions"] == 2
    for _, kw in calls:
        assert (kw["seed"], kw["eps"], kw["rtol"]) == (4, 1e-5, 1e-4)
    calls.clear()
    assert main([*argv, "--no-full"]) == 0
    (row,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("gelu (tanh)")]
    assert row.split()[-4:] == ["1.0e-09", "-", "1.0e-09", "pass"]
    assert [m for m, _ in calls] == ["directional"] and calls[0][1]["n_directions"] == 3


def test_cli_counts_skipped_cases_apart_and_verbose_prints_every_table(capsys):
    """In float32 the near-constant layernorm case is skipped (the step is as large as the rows'
    spread), and the summary counts it apart from the cases checked; -v prints the per-input
    table of cases that passed too."""
    argv = ["gradcheck", "--backend", "numpy", "--ops", "layernorm", "--dtype", "float32"]
    assert main([*argv, "--no-full"]) == 0
    out = capsys.readouterr().out
    assert "1/1 cases passed, 1 skipped" in out
    assert any(x.startswith("layernorm (near-constant rows)") and "skipped" in x
               for x in out.splitlines())  # fmt: skip
    assert "gradient check of layernorm" not in out
    assert main([*argv, "--no-full", "-v"]) == 0
    assert "gradient check of layernorm" in capsys.readouterr().out


def test_cases_are_built_as_their_names_say():
    """Each case's options and inputs are the ones its name promises (a "gelu (tanh)" case
    built with the exact GELU, or an "ignore_index" case with no ignored target, checks the
    other branch twice), and --dtype sets the dtype of every floating input."""
    from minivit.backend import get_backend

    be = get_backend("numpy")
    cases = {c.name: c for c in gradcheck_cli.build_cases(be, "float32")}
    assert cases["gelu (tanh)"].kwargs == {"approximate": "tanh"}
    assert cases["gelu (none)"].kwargs == {"approximate": "none"}
    assert cases["softmax (axis=1)"].kwargs == {"axis": 1}
    assert cases["cross_entropy (label_smoothing=0.1)"].kwargs == {"label_smoothing": 0.1}
    assert cases["dropout (eval)"].kwargs["train"] is False
    assert cases["linear (no bias)"].inputs[2] is None
    for name in ("attention (key_mask)", "attention (one valid key)", "attention (no valid key)"):
        key_mask = cases[name].inputs[-1]
        assert key_mask.dtype == bool and not key_mask.all(), name
    assert cases["attention (one valid key)"].inputs[-1].sum(axis=1).min() == 1
    assert not cases["attention (no valid key)"].inputs[-1].any(axis=1).all()
    assert cases["attention"].inputs[-1] is None
    assert (cases["cross_entropy (ignore_index)"].inputs[1] == -100).any()
    x = cases["dropout (train, p=0.3)"].inputs[0]
    out, _ = cases["dropout (train, p=0.3)"].forward(x)
    assert (out == 0).any() and not (x == 0).any()  # a mask was drawn
    floats = [a for c in cases.values() for a in c.inputs if getattr(a, "dtype", None) is not None]
    floats = [a for a in floats if a.dtype.kind == "f"]
    assert floats and all(a.dtype == np.float32 for a in floats)
