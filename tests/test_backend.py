"""minivit.backend: names, the environment variable, availability errors, mixing backends,
host/device moves, erf, seeded generators, scatter_add; and the rule that compute code never
imports numpy or cupy by name (checked with ast here and by ruff's TID251 over the repository)."""

from __future__ import annotations

import ast
import math
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from minivit import backend as B
from minivit import ops
from minivit.backend import (
    Backend,
    BackendUnavailable,
    array_module,
    available_backends,
    backend_of,
    erf,
    get_backend,
)

REPO = Path(__file__).resolve().parents[1]


# --- names and the environment variable ---------------------------------------------------


def test_get_backend_numpy():
    be = get_backend("numpy")
    assert isinstance(be, Backend) and be.name == "numpy" and be.xp is np
    assert get_backend("NumPy") is be  # case-insensitive, and cached
    assert get_backend(be) is be  # a Backend passes through
    assert "numpy" in available_backends()


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("MINIVIT_BACKEND", "numpy")
    assert get_backend().name == "numpy"
    monkeypatch.delenv("MINIVIT_BACKEND")
    assert get_backend().name == "numpy"  # the default
    monkeypatch.setenv("MINIVIT_BACKEND", "")
    assert get_backend().name == "numpy"  # empty counts as unset
    monkeypatch.setenv("MINIVIT_BACKEND", "tpu")
    want = r"\$MINIVIT_BACKEND must be one of \('numpy', 'cupy'\), got 'tpu'"  # names the variable
    with pytest.raises(ValueError, match=want):
        get_backend()


def test_environment_variable_cupy(monkeypatch):
    monkeypatch.setenv("MINIVIT_BACKEND", "cupy")
    if "cupy" in available_backends():
        assert get_backend().name == "cupy"
    else:
        with pytest.raises(BackendUnavailable, match="cupy"):
            get_backend()


@pytest.mark.parametrize("name", ["torch", "jax", "np", "cuda"])
def test_unknown_name(name):
    with pytest.raises(ValueError, match=rf"backend must be one of .*got '{name}'"):
        get_backend(name)


# --- BackendUnavailable: what is missing -----------------------------------------------------


def test_cupy_unavailable_here_says_what_is_missing():
    try:
        import cupy  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("CuPy is importable here; the fake-module tests below cover the messages")
    with pytest.raises(BackendUnavailable, match=r"needs CuPy, which could not be imported") as e:
        get_backend("cupy")
    assert isinstance(e.value, RuntimeError)
    assert "pip install minivit[gpu]" in str(e.value)


@pytest.fixture
def fresh_cupy(monkeypatch):
    """Forget any cached cupy Backend, so get_backend('cupy') imports (a fake) cupy again."""
    monkeypatch.delitem(B._CACHE, "cupy", raising=False)
    return monkeypatch


def _fake_cupy(count=None, error=None):
    def get_device_count():
        if error is not None:
            raise error
        return count

    runtime = types.SimpleNamespace(getDeviceCount=get_device_count)
    mod = types.ModuleType("cupy")
    mod.cuda = types.SimpleNamespace(runtime=runtime)
    return mod


def test_unavailable_when_cupy_cannot_be_imported(fresh_cupy):
    fresh_cupy.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    with pytest.raises(BackendUnavailable, match=r"needs CuPy, which could not be imported"):
        get_backend("cupy")
    assert "cupy" not in available_backends()


def test_unavailable_when_no_cuda_device(fresh_cupy):
    fresh_cupy.setitem(sys.modules, "cupy", _fake_cupy(count=0))
    with pytest.raises(BackendUnavailable, match=r"CuPy is installed but no CUDA device was found"):
        get_backend("cupy")


def test_unavailable_when_cuda_driver_fails(fresh_cupy):
    err = RuntimeError("cudaErrorInsufficientDriver")
    fresh_cupy.setitem(sys.modules, "cupy", _fake_cupy(error=err))
    with pytest.raises(BackendUnavailable, match=r"no CUDA device could be queried.*InsufficientD"):
        get_backend("cupy")


# --- array_module / backend_of and mixed backends --------------------------------------------


def _fake_cupy_array(like: np.ndarray):
    """An object that backend.py classifies as a cupy.ndarray (it goes by module and name).

    It carries a real dtype and shape, so an op's dtype and shape checks pass and only the
    backend check can reject it.
    """
    cls = type("ndarray", (), {"__module__": "cupy._core.core"})
    obj = cls()
    obj.dtype, obj.shape, obj.ndim, obj.size = like.dtype, like.shape, like.ndim, like.size
    return obj


def test_array_module_numpy():
    x = np.zeros(3)
    assert array_module(x) is np
    assert array_module(x, None, 2.0) is np  # None and Python scalars are skipped
    assert array_module() is np
    assert array_module(np.float32(1.0)) is np  # numpy scalars count as numpy
    assert backend_of(x) is get_backend("numpy")


def test_mixed_backends_raise_type_error_naming_both():
    x = np.zeros((2, 3))
    fake = _fake_cupy_array(x)
    with pytest.raises(TypeError, match=r"argument 0 is a numpy.ndarray and argument 2 is a cupy"):
        array_module(x, None, fake)
    with pytest.raises(TypeError, match=r"argument 1 is a numpy.ndarray and argument 0 is a cupy"):
        backend_of(fake, x)


def test_op_rejects_mixed_backends():
    # linear_forward checks dtypes and shapes first; the fake passes those, so the TypeError can
    # only come from the backend check.
    x = np.zeros((2, 3))
    with pytest.raises(TypeError, match=r"numpy.ndarray.*cupy.ndarray"):
        ops.linear_forward(x, _fake_cupy_array(np.zeros((4, 3))))


@pytest.mark.cupy
def test_real_mixed_backends_where_cupy_runs():
    if "cupy" not in available_backends():
        pytest.skip("no CuPy/CUDA here; test_op_rejects_mixed_backends covers the path")
    cp = get_backend("cupy").xp
    with pytest.raises(TypeError, match=r"numpy.ndarray.*cupy.ndarray"):
        ops.linear_forward(np.zeros((2, 3)), cp.zeros((4, 3)))


# --- moving arrays, erf, rng, scatter_add -----------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64, np.bool_])
def test_asarray_to_numpy_roundtrip_keeps_dtype(backend, dtype):
    host = (np.arange(6).reshape(2, 3) % 2).astype(dtype)
    dev = backend.asarray(host)
    assert type(dev) is backend.xp.ndarray and dev.dtype == dtype
    back = backend.to_numpy(dev)
    assert type(back) is np.ndarray and back.dtype == dtype
    np.testing.assert_array_equal(back, host)
    assert backend.asarray([1.0, 2.0], dtype=np.float32).dtype == np.float32
    assert backend.asarray(host, dtype=np.float64).dtype == np.float64
    assert backend.synchronize() is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_erf_keeps_dtype_and_matches_math(backend, dtype):
    v = np.linspace(-4, 4, 17)
    x = backend.asarray(v.astype(dtype))
    for y in (backend.erf(x), erf(x)):
        assert y.dtype == dtype and type(y) is type(x)
        ref = np.array([math.erf(t) for t in v.astype(dtype).astype(np.float64)])
        tol = 1e-6 if dtype == np.float32 else 1e-15
        np.testing.assert_allclose(backend.to_numpy(y), ref, rtol=tol, atol=tol)


def test_rng_is_deterministic_per_seed(backend):
    a = backend.to_numpy(backend.rng(42).random((4, 5), dtype=np.float32))
    b = backend.to_numpy(backend.rng(42).random((4, 5), dtype=np.float32))
    c = backend.to_numpy(backend.rng(43).random((4, 5), dtype=np.float32))
    assert a.dtype == np.float32 and np.all((a >= 0) & (a < 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    n = backend.rng(1).standard_normal((3,), dtype=np.float64)
    assert n.dtype == np.float64
    np.testing.assert_array_equal(
        backend.to_numpy(n),
        backend.to_numpy(backend.rng(1).standard_normal((3,), dtype=np.float64)),
    )
    i = backend.to_numpy(backend.rng(1).integers(0, 10, size=50))
    assert i.dtype.kind == "i" and i.min() >= 0 and i.max() < 10


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_with_repeated_indices(backend, dtype):
    a = backend.asarray(np.ones((4, 3), dtype=dtype))
    idx = np.array([0, 2, 0, 0, 3])
    vals = np.arange(15, dtype=dtype).reshape(5, 3)
    backend.scatter_add(a, backend.asarray(idx), backend.asarray(vals))
    ref = np.ones((4, 3), dtype=dtype)
    for i, row in zip(idx, vals):
        ref[i] += row  # repeated index 0 accumulates three rows
    got = backend.to_numpy(a)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, ref)


# --- no compute module imports numpy or cupy by name ----------------------------------------

BANNED = {"numpy", "cupy", "cupyx"}


def _compute_files():
    files = sorted((REPO / "minivit" / "ops").glob("*.py"))
    files += [REPO / "minivit" / "blocks.py", REPO / "minivit" / "optim.py"]
    files += sorted((REPO / "minivit" / "models").rglob("*.py"))
    return [f for f in files if f.exists()]


def _banned_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "id", getattr(node.func, "attr", None))
            in ("__import__", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            names = [str(node.args[0].value)]
        else:
            continue
        found += [f"line {node.lineno}: {n}" for n in names if n.split(".")[0] in BANNED]
    return found


def test_ast_scanner_catches_every_form():
    for src in (
        "import numpy as np",
        "import cupy",
        "from numpy import linalg",
        "import numpy.linalg",
        "from cupyx.scipy import special",
        "def f():\n    import numpy",
        "importlib.import_module('cupy')",
        "__import__('numpy')",
    ):
        assert _banned_imports(src), src
    for src in ("from ..backend import array_module", "from .linear import x", "import math"):
        assert not _banned_imports(src), src


def test_compute_modules_do_not_import_numpy_or_cupy():
    files = _compute_files()
    assert any(f.parent.name == "ops" for f in files), "no op modules found to scan"
    offenders = {
        str(f.relative_to(REPO)): bad
        for f in files
        if (bad := _banned_imports(f.read_text(encoding="utf-8")))
    }
    assert not offenders, f"compute modules import numpy/cupy by name: {offenders}"


def _ruff():
    exe = shutil.which("ruff")
    if exe:
        return [exe]
    try:
        import ruff  # noqa: F401
    except ImportError:
        return None
    return [sys.executable, "-m", "ruff"]


def test_ruff_check_repository():
    cmd = _ruff()
    if cmd is None:
        pytest.skip("ruff is not installed (pip install ruff)")
    res = subprocess.run(
        [*cmd, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, f"ruff check failed:\n{res.stdout}\n{res.stderr}"


def test_contiguous_on_and_switch(monkeypatch):
    from minivit.backend import Switch, contiguous_on

    a = np.ones((3, 4))
    assert contiguous_on("numpy", a, None, a[1:])
    assert not contiguous_on("numpy", a, a.T)
    assert not contiguous_on("cupy", a)
    for value, on in (("0", False), ("False", False), ("no", False), ("1", True), ("yes", True)):
        monkeypatch.setenv("MINIVIT_TEST_SWITCH", value)
        assert Switch("MINIVIT_TEST_SWITCH").on is on
    monkeypatch.delenv("MINIVIT_TEST_SWITCH")
    s = Switch("MINIVIT_TEST_SWITCH")
    assert s.on and s.set(False) is True and s.on is False


def test_host_values_reads_device_scalars_in_one_go(backend):
    a = backend.asarray(np.array([[3, -2], [7, 1]]))
    assert backend.host_values(a.min(), a.max(), (a > 0).all(), a.sum()) == [-2, 7, 0, 9]
    assert backend.host_values() == []
    big = backend.asarray(np.array([2**60 + 1], dtype=np.uint64))  # no promotion to float64
    assert backend.host_values(big.max(), a.min()) == [2**60 + 1, -2]
