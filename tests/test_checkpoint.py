"""minivit.checkpoint: safetensors round trips, atomic writes, metadata, bad files, no pickle."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from minivit import ViT
from minivit.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_model,
    load_weights_into,
    read_metadata,
    save_checkpoint,
    save_model,
    split_prefix,
)


def small(backend=None, **kw):
    cfg = dict(img_size=4, patch_size=2, in_chans=1, num_classes=3, embed_dim=8, depth=1,
               num_heads=2, backend=backend)  # fmt: skip
    cfg.update(kw)
    return ViT(**cfg)


def test_model_roundtrip(backend, tmp_path):
    m = small(backend, seed=1, dtype="float64")
    p = save_model(tmp_path / "m.safetensors", m, metadata={"note": {"a": 1}})
    m2, meta = load_model(p, backend=backend)
    assert meta["format"] == "minivit" and meta["model"] == "ViT" and meta["note"] == {"a": 1}
    assert m2.config == m.config and m2.dtype == "float64"
    for k in m.params:
        assert (backend.to_numpy(m2.params[k]) == backend.to_numpy(m.params[k])).all()
    # the file is an ordinary safetensors state dict under timm's names
    from safetensors.numpy import load_file

    assert set(load_file(p)) == set(m.params)


def test_atomic_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "ck.safetensors"
    save_checkpoint(path, {"a": np.arange(3.0)}, {"v": 1})
    before = path.read_bytes()
    import safetensors.numpy

    def boom(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": np.arange(5.0)}, {"v": 2})
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ck.safetensors"]  # no temp file left behind
    monkeypatch.undo()
    t, meta = load_checkpoint(path)
    assert meta == {"v": 1} and (t["a"] == np.arange(3.0)).all()


def test_corrupt_and_truncated_files(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_model(path, small())
    data = path.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    for name in ("trunc", "junk", "empty"):
        with pytest.raises(CheckpointError, match="corrupt or truncated"):
            load_model(tmp_path / f"{name}.safetensors")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nope.safetensors")


def test_other_config_is_refused(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_model(path, small())
    with pytest.raises(CheckpointError, match="num_heads: checkpoint 2, model 4"):
        load_weights_into(small(num_heads=4), path)  # same shapes, other config
    with pytest.raises(CheckpointError, match="embed_dim"):
        load_weights_into(small(embed_dim=12, num_heads=2), path)
    load_weights_into(small(drop_rate=0.1), path)  # dropout is not architecture


def test_a_file_missing_a_tensor_is_refused(tmp_path):
    """load_weights_into is strict by default: a minivit file that lost a tensor does not load
    with that parameter left at the model's random initialisation."""
    path = tmp_path / "ck.safetensors"
    save_model(path, small(seed=1))
    tensors, meta = load_checkpoint(path)
    del tensors["head.bias"]
    save_checkpoint(path, tensors, meta)
    with pytest.raises(CheckpointError) as err:
        load_weights_into(small(seed=2), path)
    assert str(err.value) == (
        f"checkpoint {str(path)!r} does not fit the model: "
        "state_dict does not match ViT: missing keys: head.bias"
    )


def test_metadata_is_json_and_no_pickle(tmp_path):
    path = tmp_path / "ck.safetensors"
    save_model(path, small(), metadata={"train": {"epoch": 3, "history": [{"x": 1.5}]}})
    meta = read_metadata(path)
    assert meta["train"]["epoch"] == 3 and meta["config"]["embed_dim"] == 8
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert json.loads(header["__metadata__"]["config"])["depth"] == 1
    import minivit.checkpoint as ck

    src = open(ck.__file__).read()
    assert "pickle" not in src.replace("no pickle", "") and "torch.load" not in src


def test_foreign_file_at_another_image_size(tmp_path):
    """A timm-named file loads at another img_size with its pos_embed resampled."""
    from safetensors.numpy import save_file

    from minivit.convert import resample_abs_pos_embed

    m = small(img_size=8)  # 4x4 grid
    save_file(m.state_dict(), tmp_path / "model.safetensors")  # no minivit metadata: foreign
    big, _ = load_model(tmp_path / "model.safetensors", num_heads=2, img_size=12)  # 6x6 grid
    assert big.params["pos_embed"].shape == (1, 37, 8)
    expect = resample_abs_pos_embed(m.state_dict()["pos_embed"], (6, 6))
    np.testing.assert_array_equal(big.params["pos_embed"], expect)
    out = big.forward(np.zeros((1, 1, 12, 12), np.float32))
    assert out.shape == (1, 3)


def test_load_model_takes_a_folder(tmp_path):
    """A folder as a run or the hub leaves it: a run's checkpoint.safetensors first, else the
    published model.safetensors (with its config.json beside it); a folder with neither is a
    FileNotFoundError naming both."""
    from safetensors.numpy import save_file

    m = small(seed=1)
    (tmp_path / "hub").mkdir()
    save_file(m.state_dict(), tmp_path / "hub" / "model.safetensors")
    (tmp_path / "hub" / "config.json").write_text(json.dumps({"num_attention_heads": 2}))
    loaded, _ = load_model(tmp_path / "hub")
    assert loaded.config["num_heads"] == 2
    np.testing.assert_array_equal(loaded.params["head.weight"], m.params["head.weight"])
    (tmp_path / "run").mkdir()
    save_model(tmp_path / "run" / "checkpoint.safetensors", small(seed=2))
    save_file(m.state_dict(), tmp_path / "run" / "model.safetensors")  # (the run's comes first)
    loaded, meta = load_model(tmp_path / "run")
    assert meta["format"] == "minivit"
    np.testing.assert_array_equal(loaded.params["head.weight"], small(seed=2).params["head.weight"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither checkpoint.safetensors .* nor model"):
        load_model(tmp_path / "empty")


def test_the_layernorm_eps_of_a_hub_config_json_is_kept(tmp_path):
    """transformers' config.json gives the layernorm eps (its ViT default is 1e-12), which the
    weights cannot show: the model takes it (here 1e-3, far from minivit's 1e-6, so that the
    outputs tell them apart) and computes what a ViT built with it computes."""
    from safetensors.numpy import save_file

    m = small(seed=1, dtype="float64", eps=1e-3)
    save_file(m.state_dict(), tmp_path / "model.safetensors")
    cfg = {"num_attention_heads": 2, "layer_norm_eps": 1e-3}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded, _ = load_model(tmp_path, dtype="float64")
    assert loaded.config["eps"] == 1e-3
    x = np.random.default_rng(0).standard_normal((2, 1, 4, 4)) * 0.05  # small variance
    np.testing.assert_allclose(loaded.forward(x), m.forward(x), rtol=1e-12, atol=1e-14)
    other = small(seed=1, dtype="float64")  # the default eps: other outputs
    assert not np.allclose(other.forward(x), m.forward(x), rtol=1e-6, atol=0)


def test_written_files_take_the_umask_like_a_plain_open(tmp_path):
    """mkstemp makes its temporary file 0600 and the atomic rename keeps the mode: checkpoints
    and metrics were unreadable to other users. They now get what open(path, "w") would."""
    from minivit.train.common import write_json

    old = os.umask(0o022)
    try:
        ckpt = save_checkpoint(tmp_path / "a.safetensors", {"w": np.zeros(2)})
        meta = write_json(tmp_path / "m.json", {"a": 1})
        os.umask(0o077)
        private = save_checkpoint(tmp_path / "b.safetensors", {"w": np.zeros(2)})
    finally:
        os.umask(old)
    assert (ckpt.stat().st_mode & 0o777) == 0o644
    assert (meta.stat().st_mode & 0o777) == 0o644
    assert (private.stat().st_mode & 0o777) == 0o600


@pytest.mark.oracle
def test_a_resaved_hugging_face_vilt_keeps_its_missing_heads(tmp_path):
    """A Hugging Face ViltForMaskedLM has no ITM head: load_model says so (missing_heads), and
    a copy written by save_model, loaded again, must still say so (and so on, copy after copy),
    or predict would run the randomly initialised head as if it were trained."""
    from test_predict_vilt import _hf_folder

    _hf_folder(tmp_path / "hf")
    model, meta = load_model(tmp_path / "hf" / "model.safetensors")
    assert meta["missing_heads"] == ["itm_score"]
    copy = save_model(tmp_path / "copy" / "checkpoint.safetensors", model)
    assert read_metadata(copy)["missing_heads"] == ["itm_score"]
    again, meta2 = load_model(copy)
    assert meta2["missing_heads"] == ["itm_score"] and again.config == model.config
    for k in model.params:
        np.testing.assert_array_equal(again.params[k], model.params[k])
    twice, meta3 = load_model(save_model(tmp_path / "twice.safetensors", again))
    assert meta3["missing_heads"] == ["itm_score"]
    # a VQA head asked for on a file without one is random too, not a lack in the body
    _, meta4 = load_model(tmp_path / "hf" / "model.safetensors", num_vqa_labels=3)
    assert meta4["missing_heads"] == ["itm_score", "vqa_classifier"]
    # a model that lacks no head writes no missing_heads
    full, _ = load_model(save_model(tmp_path / "full.safetensors", small()))
    assert "missing_heads" not in read_metadata(tmp_path / "full.safetensors")
    assert not full.missing_heads


def test_a_training_checkpoint_loads_strictly_past_its_optimizer_state(tmp_path):
    """Training writes the optimizer state beside the weights as ``optim.<key>`` tensors
    (train.common.save_training_checkpoint). Loading the weights alone, strictly, must leave
    those out rather than refuse them as unexpected keys; the optimizer part splits back out
    under its own names, the prefix removed exactly."""
    from minivit.optim import AdamW
    from minivit.train.common import History, save_training_checkpoint

    m = small(seed=1, dtype="float64")
    opt = AdamW(m.params)
    p = save_training_checkpoint(tmp_path / "ck.safetensors", m, opt, 1, History())
    tensors, _ = load_checkpoint(p)
    assert any(k.startswith("optim.") for k in tensors)
    fresh = small(seed=2, dtype="float64")
    load_weights_into(fresh, p, strict=True)
    for k in m.params:
        np.testing.assert_array_equal(fresh.params[k], m.params[k], err_msg=k)
    state, rest = split_prefix(tensors, "optim.")
    assert set(state) == set(opt.state_dict()) and set(rest) == set(m.params)
    assert split_prefix({"optim.a": 1, "b": 2}, "optim.") == ({"a": 1}, {"b": 2})
