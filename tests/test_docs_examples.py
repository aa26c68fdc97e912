"""The documentation's Python examples run as written, and do what their comments say.

Every ```python block of README.md and docs/ is run here, unchanged, after a setup that defines
the names the example takes as given (its inputs, a model, a vocabulary file). Then the claims
in its comments are checked: shapes, dtypes, the text a tokenizer gives back. A new example
fails this test until it has a setup here, so none can go stale unnoticed.

NumPy only: the examples do not name a backend.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import minivit

ROOT = Path(__file__).resolve().parents[1]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def examples():
    """(file relative to the repository, index in the file, code) of every Python example."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    return [
        (str(path.relative_to(ROOT)), i, code)
        for path in files
        for i, code in enumerate(_BLOCK.findall(path.read_text(encoding="utf-8")))
    ]


# ---- setups (the names an example takes as given) and checks (what its comments claim) ----


def _ops_setup(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    B, N, D = 2, 5, 8
    mask = np.ones((B, N), dtype=bool)
    mask[1, 3:] = False  # the second sequence's last two keys are padding
    return dict(
        x=rng.standard_normal((B, N, D)),
        w_qkv=0.3 * rng.standard_normal((3 * D, D)),
        b_qkv=0.1 * rng.standard_normal(3 * D),
        w_proj=0.3 * rng.standard_normal((D, D)),
        b_proj=0.1 * rng.standard_normal(D),
        mask=mask,
        dout=rng.standard_normal((B, N, D)),
    )


def _ops_check(ns):
    B, N, D = ns["x"].shape
    assert ns["out"].shape == (B, N, D)
    assert ns["cache"].attn.shape == (B, 4, N, N)  # (B, H, N, N)
    assert np.allclose(ns["cache"].attn.sum(-1), 1.0)
    assert np.all(ns["cache"].attn[1, :, :, 3:] == 0.0)  # masked keys take no attention
    for g, p in zip(
        ("dx", "dw_qkv", "db_qkv", "dw_proj", "db_proj"),
        ("x", "w_qkv", "b_qkv", "w_proj", "b_proj"),
    ):
        assert ns[g].shape == ns[p].shape


def _model_setup(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    return dict(
        images=rng.standard_normal((2, 3, 224, 224)),
        dlogits=rng.standard_normal((2, 1000)),
    )


def _model_check(ns):
    assert ns["logits"].shape == (2, 1000)  # (B, 1000)
    assert ns["dimages"].shape == ns["images"].shape
    model = ns["model"]
    assert set(model.grads) == set(model.params)
    assert sorted(model.params)[:3] == [
        "blocks.0.attn.proj.bias",
        "blocks.0.attn.proj.weight",
        "blocks.0.attn.qkv.bias",
    ]


def _resample_setup(tmp_path, monkeypatch):
    return dict(model=minivit.create_model("vit_tiny_patch16_224"))


def _resample_check(ns):
    D = ns["model"].config["embed_dim"]
    assert ns["sd"]["pos_embed"].shape == (1, 1 + 576, D)
    assert ns["big"].params["pos_embed"].shape == (1, 1 + 576, D)
    assert np.array_equal(ns["big"].params["pos_embed"], ns["sd"]["pos_embed"])
    assert np.array_equal(
        ns["big"].params["pos_embed"][:, 0], ns["model"].params["pos_embed"][:, 0]
    )


_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "on", "the", "table", "cup", "##s"]


def _vilt_setup(tmp_path, monkeypatch):
    from minivit.models.vilt import ViLT

    folder = tmp_path / "vilt-b32-mlm"  # the example's relative path, under a scratch folder
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(_VOCAB) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    model = ViLT(
        vocab_size=len(_VOCAB), img_size=64, patch_size=32, embed_dim=32, depth=1, num_heads=2
    )
    images = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    return dict(model=model, images=images)


def _vilt_check(ns):
    tok, ids, mask = ns["tok"], ns["ids"], ns["mask"]
    assert tok.max_text_len == 40  # max_text_len=40, ViLT's
    assert ids.shape == (1, 40) and ids.dtype == np.int64  # (1, 40) int64
    assert mask.shape == (1, 40) and mask.dtype == np.bool_  # (1, 40) bool
    logits = ns["logits"]
    assert logits.shape == (1, 40, len(_VOCAB))  # a row of vocabulary scores per text token
    assert ns["_"] is not None  # the head's cache, for its backward
    at_mask = logits[0, list(ids[0]).index(tok.mask_id)]
    assert ns["words"] == [_VOCAB[int(at_mask.argmax())]]  # the word at [MASK]
    assert ns["text"] == "a on the table"  # decode drops the specials, [MASK] with them


# (file, index in the file) -> (setup, check, how to name the example's last value)
CASES = {
    ("README.md", 0): (_ops_setup, _ops_check, None),
    ("README.md", 1): (_model_setup, _model_check, None),
    ("docs/vit.md", 0): (_resample_setup, _resample_check, None),
    ("docs/vilt.md", 0): (_vilt_setup, _vilt_check, ("words", "text")),
}


def test_every_example_has_a_case():
    found = {(f, i) for f, i, _ in examples()}
    assert found == set(CASES), (
        f"examples without a case here: {sorted(found - set(CASES))}; "
        f"cases whose example is gone: {sorted(set(CASES) - found)}"
    )


def _named_tail(code, names):
    """The example with its last bare expressions bound to ``names`` (an example ends with
    expressions shown for their value, as at a prompt): the check can then read them."""
    lines = code.rstrip("\n").split("\n")
    for name, k in zip(reversed(names), range(len(lines) - 1, -1, -1)):
        lines[k] = f"{name} = {lines[k]}"
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", sorted(CASES), ids=lambda w: f"{w[0]}-{w[1]}")
def test_example_runs_as_written(where, tmp_path, monkeypatch):
    code = dict(((f, i), c) for f, i, c in examples()).get(where)
    assert code is not None, f"no example {where[1]} in {where[0]} (see the first test)"
    setup, check, names = CASES[where]
    ns = setup(tmp_path, monkeypatch)
    if names:
        code = _named_tail(code, names)
    exec(compile(code, f"{where[0]} example {where[1]}", "exec"), ns)  # noqa: S102
    check(ns)
