"""The ``minivit`` command line.

Each command lives in its own module, which provides two functions::

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int        # the exit status

This file only wires them together, so adding a command never touches another command's code.
Modules are imported when the parser is built; they keep heavy imports (matplotlib, tqdm, torch)
inside ``run`` so that ``minivit --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# (command words, module, one-line help)
COMMANDS: list[tuple[tuple[str, ...], str, str]] = [
    (("train", "vit"), "minivit.train.vit", "train a ViT (default: sklearn digits)"),
    (("train", "hybrid"), "minivit.train.hybrid", "train a Hybrid ViT (CNN stem + encoder)"),
    (("train", "vilt"), "minivit.train.vilt", "train ViLT on generated image-caption data"),
    (("eval",), "minivit.train.evaluate", "evaluate a checkpoint on its test split"),
    (("predict",), "minivit.train.predict", "classify images; ViLT: match a caption, fill [MASK]"),
    (("gradcheck",), "minivit.gradcheck_cli", "check every op's backward numerically"),
    (("bench",), "minivit.bench", "time ops and models on a backend, beside PyTorch"),
]


def add_backend_argument(
    parser: argparse.ArgumentParser,
    help: str = "array backend (default: $MINIVIT_BACKEND, else numpy)",
) -> None:
    """The ``--backend numpy|cupy`` option every command takes (a command module's
    ``BACKEND_HELP``, if it has one, says what its default means there)."""
    parser.add_argument("--backend", choices=["numpy", "cupy"], default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minivit",
        description="ViT and ViLT from scratch in NumPy and CuPy, backward passes by hand.",
    )
    top = parser.add_subparsers(dest="command", metavar="COMMAND")
    top.required = True
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, module_name, help_text in COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a command whose module is not part of this install
        if len(words) == 1:
            sub = top.add_parser(words[0], help=help_text, description=help_text)
        else:
            if words[0] not in groups:
                grp = top.add_parser(words[0], help=f"{words[0]} a model")
                groups[words[0]] = grp.add_subparsers(dest="what", metavar="MODEL")
                groups[words[0]].required = True
            sub = groups[words[0]].add_parser(words[1], help=help_text, description=help_text)
        add_backend_argument(
            sub, **({"help": module.BACKEND_HELP} if hasattr(module, "BACKEND_HELP") else {})
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def console_main() -> int:
    """The ``minivit`` command (and ``python -m minivit``): for ``bench``, the fastest OpenBLAS
    kernels first (minivit/blas_kernels.py), then :func:`main`. Tests call :func:`main`
    itself, which changes no process setting."""
    words = sys.argv[1:]
    if words[:1] == ["bench"] and not {"-h", "--help"} & set(words):
        # before NumPy loads (building the parser loads it): the fastest OpenBLAS kernels
        from .blas_kernels import apply_for_command

        apply_for_command()
    return main()


def typed_options(argv: list[str] | None = None) -> set[str]:
    """The options typed on the command line ``argv`` (by their dest), whatever their values:
    ``argv`` parsed again with every default suppressed, so only what was typed is set. A
    ``--resume`` checks these against the run's recipe, a default value typed included."""
    probe = build_parser()
    _suppress_defaults(probe)
    return set(vars(probe.parse_args(argv)))


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    parser._defaults.clear()  # set_defaults' entries (_run)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _suppress_defaults(sub)
        else:
            action.default = argparse.SUPPRESS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``argv`` parsed by the ``minivit`` parser. For a ``--resume``, ``args._given`` also holds
    the options typed (:func:`typed_options`), which the run's recipe is checked against."""
    args = build_parser().parse_args(argv)
    if getattr(args, "resume", None):
        args._given = typed_options(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from .backend import BackendUnavailable
    from .heap import keep_freed_memory

    # Every command is a process of its own: its train steps reuse the memory the last step
    # freed instead of faulting it in again (minivit/heap.py; MINIVIT_KEEP_MEMORY=0: off).
    keep_freed_memory()

    from .backend import settings_problems
    from .checkpoint import CheckpointError

    try:
        problems = settings_problems()  # a misspelt MINIVIT_* setting is refused, not ignored
        if problems:
            raise ValueError("; ".join(problems))
        return int(args._run(args) or 0)
    except (BackendUnavailable, OSError, CheckpointError, ValueError) as exc:
        # A backend that cannot run here (CuPy or the device missing), a missing or unreadable
        # file, a checkpoint of the wrong kind, a refused value: the message says what to
        # change; MINIVIT_TRACEBACK=1 shows where it was raised.
        if os.environ.get("MINIVIT_TRACEBACK", "0") not in ("", "0"):
            raise
        print(f"minivit: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("minivit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(console_main())
