"""``minivit bench``: time ops and models on a backend, beside PyTorch eager.

The harness itself lives in the repository's ``benchmarks/`` folder (benchmarks/README.md);
this command runs it from a source checkout (``pip install -e .``). ``--backend`` (added by the
CLI) picks one backend; without it ``$MINIVIT_BACKEND`` does, as for every command, and without
either NumPy runs, plus CuPy when a CUDA device is present. A backend that cannot run here, or
an unknown ``--models`` or ``--ops`` name, is a user error (exit status 2) before anything runs.
"""

from __future__ import annotations

import os
import sys


def _benchmarks_package(required: bool = True):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.isfile(os.path.join(root, "benchmarks", "run.py")):
        if not required:
            return None
        raise SystemExit(
            "minivit bench needs the repository's benchmarks/ folder next to the minivit "
            f"package (looked in {root}); run it from a source checkout (pip install -e .)"
        )
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import run as bench_run

    return bench_run


# what --backend (added by the CLI) defaults to here
BACKEND_HELP = (
    "array backend (default: $MINIVIT_BACKEND, else numpy, plus cupy when a CUDA device is present)"
)


def add_arguments(parser) -> None:
    # The options are benchmarks/run.py's own, minus --backend (the CLI adds that one). Without
    # a source checkout there are none, and run() says why.
    bench_run = _benchmarks_package(required=False)
    if bench_run is not None:
        bench_run.add_arguments(parser, with_backend=False)


def run(args) -> int:
    from .backend import env_backend_name, get_backend

    # ValueError (exit status 2) names a wrong name, BackendUnavailable what is missing
    name = args.backend or env_backend_name()
    if name:
        args.backend = get_backend(name).name
    # the timed benchmark, or --profile (op by op) or --perf (by kind of work): run.py decides
    return _benchmarks_package().dispatch(args)
