"""``minivit bench``: time ops and models on a backend, beside PyTorch eager.

The harness itself lives in the repository's ``benchmarks/`` folder (benchmarks/README.md);
this command runs it from a source checkout (``pip install -e .``). ``--backend`` (added by the
CLI) picks one backend; without it NumPy runs, plus CuPy when a CUDA device is present.
"""

from __future__ import annotations

import os
import sys


def _benchmarks_package():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        raise SystemExit(
            "minivit bench needs the repository's benchmarks/ folder next to the minivit "
            f"package (looked in {root}); run it from a source checkout (pip install -e .)"
        )
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import run as bench_run

    return bench_run


def add_arguments(parser) -> None:
    # Same options as benchmarks/run.py, minus --backend (the CLI adds that one).
    parser.add_argument("--quick", action="store_true", help="a small subset (< 2 min on 2 cores)")
    parser.add_argument(
        "--ops",
        nargs="*",
        default=None,
        metavar="OP",
        help="ops: linear layernorm gelu softmax attention cross_entropy "
        "sinkhorn (default all; the bare flag skips ops)",
    )
    parser.add_argument(
        "--models",
        nargs="*",
        default=None,
        metavar="MODEL",
        help="models: vit_tiny_patch16_224 vit_small_patch16_224 "
        "vit_base_patch16_224 vilt_b32 hybrid_resnet_small_32 (default all; "
        "the bare flag skips models)",
    )
    parser.add_argument(
        "--out", default=None, help="results folder (default benchmarks/results/<device-tag>)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 5, quick 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed runs first (default 2, quick 1)"
    )
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default: fp32)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for BLAS, torch and minivit's elementwise pool",
    )
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch twins")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    parser.add_argument(
        "--gap",
        type=float,
        default=None,
        help="idle seconds before each timed CPU run (default 0.12 models, 0.01 ops)",
    )


def run(args) -> int:
    if args.backend:
        from .backend import get_backend

        get_backend(args.backend)  # BackendUnavailable (exit status 2) says what is missing
    bench_run = _benchmarks_package()
    cfg = bench_run.config_from_args(args)
    bench_run.execute(cfg, args.out)
    return 0
