"""Checkpoints as safetensors: atomic writes, config in the metadata, no pickle anywhere.

A minivit checkpoint is one ``.safetensors`` file:

* the model's parameters under their own (timm) names, so timm and other safetensors readers see
  an ordinary ViT state dict;
* optionally other tensors under a prefix, e.g. the optimizer state as ``optim.<key>``;
* text metadata: ``format = "minivit"``, ``model`` (the class name), ``config`` (the model's
  keyword arguments as JSON) and any extra JSON entries (training state: epoch, history, ...).

Writes go to a temporary file in the same folder, are fsync'ed, then ``os.replace``d over the
target, so a crash or an error mid-save leaves the previous checkpoint intact.

:func:`load_model` also reads weights that were not written here: a timm or Hugging Face
``model.safetensors`` (the naming is detected and converted; see :mod:`minivit.convert`).
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

__all__ = [
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "save_model",
    "load_model",
    "load_weights_into",
    "read_metadata",
]

FORMAT = "minivit"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, or was written for another config."""


RUN_FILE = "checkpoint.safetensors"  # the checkpoint in a minivit run's folder
WEIGHTS_FILE = "model.safetensors"  # weights as timm and Hugging Face publish them


def checkpoint_file(path, weights=True) -> Path:
    """A folder or a checkpoint file -> the checkpoint file (FileNotFoundError if none).

    A folder holds a run's ``checkpoint.safetensors``, or else (``weights=True``) weights as
    timm and Hugging Face publish them: ``model.safetensors``, with a ``config.json`` beside it.
    ``weights=False`` is for what only a run can give (``minivit eval``, ``--resume``)."""
    path = Path(path)
    if path.is_dir():
        for name in (RUN_FILE, WEIGHTS_FILE) if weights else (RUN_FILE,):
            if (path / name).exists():
                return path / name
        what = f"no {RUN_FILE} (a minivit run)"
        if weights:
            what = (
                f"neither {RUN_FILE} (a minivit run) nor {WEIGHTS_FILE} (timm or Hugging Face "
                "weights)"
            )
        raise FileNotFoundError(f"no checkpoint in {str(path)!r}: {what}")
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {str(path)!r}")
    return path


def _to_host(a):
    # cupy arrays have .get(); everything becomes a contiguous numpy array.
    if hasattr(a, "get") and type(a).__module__.startswith("cupy"):
        a = a.get()
    return np.ascontiguousarray(np.asarray(a))


def publish(tmp, path) -> None:
    """Rename the finished temporary file ``tmp`` to ``path`` (atomic), with the mode a plain
    ``open(path, "w")`` would give: ``mkstemp`` makes its file 0600, and the rename keeps that,
    which would leave checkpoints unreadable to other users and containers."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


def save_checkpoint(path, tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (name -> array, any backend) and JSON-able ``metadata`` atomically.

    Each metadata value is stored as a JSON string (safetensors metadata is str -> str).
    Returns the path written.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    host = {k: _to_host(v) for k, v in tensors.items()}
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(host, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        publish(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    # Make the rename itself durable (POSIX: fsync the directory).
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _open_error(path, exc):
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return CheckpointError(
        f"checkpoint {str(path)!r} ({size} bytes) is corrupt or truncated and cannot be read "
        f"as safetensors: {exc}"
    )


def read_metadata(path) -> dict:
    """The metadata of a safetensors file, each value JSON-decoded where it is JSON."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise _open_error(path, exc) from exc
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v  # metadata written by other tools is plain text
    return out


def load_checkpoint(path) -> tuple[dict, dict]:
    """(tensors, metadata) from a safetensors file; tensors are numpy arrays.

    Raises FileNotFoundError when missing and :class:`CheckpointError` when the file cannot be
    parsed (corrupt header, truncated data).
    """
    from safetensors.numpy import load_file

    path = Path(path)
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except Exception as exc:
        raise _open_error(path, exc) from exc
    return tensors, meta


def split_prefix(tensors: dict, prefix: str) -> tuple[dict, dict]:
    """(the entries under ``prefix`` with the prefix removed, all the others)."""
    inside = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    outside = {k: v for k, v in tensors.items() if not k.startswith(prefix)}
    return inside, outside


def save_model(path, model, extra_tensors: dict | None = None, metadata: dict | None = None):
    """Save ``model.params`` (plus ``extra_tensors``, whose names must not clash) with the
    model's class name and config in the metadata.

    A model that :func:`load_model` read from weights without some of its heads (a Hugging Face
    ViLT MLM checkpoint has no ITM head) carries their names in ``model.missing_heads``; they are
    written as the metadata's ``"missing_heads"``, so that the saved file, loaded again, still
    says those heads are random (``minivit predict`` leaves them out). ``metadata`` entries win
    over these."""
    tensors = dict(model.state_dict())
    for k, v in (extra_tensors or {}).items():
        if k in tensors:
            raise ValueError(f"extra tensor {k!r} clashes with a model parameter name")
        tensors[k] = v
    meta = {"format": FORMAT, "model": type(model).__name__, "config": model.config}
    meta["dtype"] = model.dtype
    if model.missing_heads:
        meta["missing_heads"] = list(model.missing_heads)
    meta.update(metadata or {})
    return save_checkpoint(path, tensors, meta)


def _model_classes():
    from .models.vit import ViT

    classes = {"ViT": ViT}
    for mod, name in (("minivit.models.hybrid", "HybridViT"), ("minivit.models.vilt", "ViLT")):
        try:
            module = __import__(mod, fromlist=[name])
            classes[name] = getattr(module, name)
        except (ImportError, AttributeError):
            pass
    return classes


# Config entries that shape no weight: dropout rates, and ViLT's patch sampling (a checkpoint
# trained with max_image_len=K loads into a model that keeps every patch, and back)
_NOT_ARCHITECTURE = ("drop_rate", "drop_path_rate", "max_image_len")


def load_weights_into(model, path, strict=True) -> dict:
    """Load a checkpoint's parameters into an existing ``model``; returns the metadata.

    A minivit checkpoint written for another config (another class, or any differing config
    entry, such as num_heads, which leaves no trace in the shapes) raises
    :class:`CheckpointError` naming the differences. Tensors other than the model's (e.g. the
    optimizer's ``optim.*``) are ignored here.
    """
    tensors, meta = load_checkpoint(path)
    if meta.get("format") == FORMAT:
        if meta.get("model") != type(model).__name__:
            raise CheckpointError(
                f"checkpoint {str(path)!r} holds a {meta.get('model')}, not a "
                f"{type(model).__name__}"
            )
        saved = meta.get("config", {})
        diffs = [
            f"{k}: checkpoint {saved.get(k)!r}, model {model.config.get(k)!r}"
            for k in sorted(set(saved) | set(model.config))
            if saved.get(k) != model.config.get(k) and k not in _NOT_ARCHITECTURE
        ]
        if diffs:
            raise CheckpointError(
                f"checkpoint {str(path)!r} was written for another config: " + "; ".join(diffs)
            )
        tensors = {k: v for k, v in tensors.items() if k in model.params}
    else:
        from .convert import to_timm_vit

        tensors = to_timm_vit(tensors)
    try:
        model.load_state_dict(tensors, strict=strict)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model: {exc}") from exc
    return meta


def load_model(path, backend=None, dtype=None, num_heads=None, **overrides):
    """Build a model from a checkpoint file and load its weights.

    * a minivit checkpoint: the class and config come from its metadata;
    * a timm or Hugging Face ``model.safetensors`` of a ViT: names are converted to timm's and
      the ViT config is read off the shapes. The head count leaves no trace in the weights: it
      comes from ``num_heads``, else from a ``config.json`` beside the file, else the count
      timm's common configs give the width (``convert.default_num_heads``: heads of 64, but 16
      heads for the ViT-H, ViT-g, ViT-G and SigLIP so400m widths). The ``config.json`` may be
      transformers' (``num_attention_heads``, and ``layer_norm_eps`` for the eps) or the one
      timm writes for the hub (``model_args.num_heads``, else the registered config of its
      ``architecture``). Whatever that ``config.json`` says that the shapes show too (depth,
      width, MLP width, patch size, channels, classes, pooling, vocabulary) must agree with them
      (``CheckpointError`` otherwise: a file missing its last block would load shallower), and
      an option minivit's ViT does not implement (transformers' ``hidden_act`` other than
      ``"gelu"``; timm's no class token, register tokens, another activation, ...) is refused
      rather than computed differently.
    * a Hugging Face ViLT ``model.safetensors`` (``ViltForMaskedLM``, ``ViltModel``,
      ``ViltForQuestionAnswering``, ...): converted with ``from_hf_vilt``, the config read off
      the shapes and the same ``config.json``. Heads the file lacks (the MLM checkpoint has no
      ITM head) keep minivit's random initialisation; the metadata's ``"missing_heads"`` names
      them, so that a caller does not mistake them for trained ones.

    The model's ``missing_heads`` attribute holds the same names (empty when no head is missing),
    also for a minivit file that recorded one, so that :func:`save_model` writes it again: a
    re-saved Hugging Face model keeps saying which heads are random.

    ``overrides`` replace config entries (e.g. drop_rate). For a foreign ViT file,
    ``img_size=...`` gives a model for another image size, its position embedding resampled like
    timm's ``resample_abs_pos_embed`` (bicubic, antialiased, CLS token kept). Returns
    (model, metadata).

    ``path`` may also be a folder: a minivit run's, or one that timm or Hugging Face publish
    (:func:`checkpoint_file`).
    """
    path = checkpoint_file(path)
    meta = read_metadata(path)
    if meta.get("format") == FORMAT:
        classes = _model_classes()
        name = meta.get("model")
        if name not in classes:
            raise CheckpointError(f"checkpoint {str(path)!r} holds an unknown model {name!r}")
        cfg = {**meta.get("config", {}), **overrides}
        model = classes[name](**cfg, dtype=dtype or meta.get("dtype", "float32"), backend=backend)
        load_weights_into(model, path)
        model.missing_heads = tuple(meta.get("missing_heads", ()))  # re-saved (save_model)
        return model, meta
    from .convert import is_hf_vilt

    tensors, meta = load_checkpoint(path)
    hf = _hf_config_beside(path)
    declared = _declared_vit_config(path, hf)  # first: it names an option minivit lacks
    if num_heads is None and "num_heads" in declared:
        num_heads = declared["num_heads"][1]
    if is_hf_vilt(tensors):
        return _load_hf_vilt(path, tensors, meta, declared, backend, dtype, num_heads, overrides)
    from .convert import infer_vit_config, to_timm_vit
    from .models.vit import ViT

    try:
        sd = to_timm_vit(tensors)
        inferred = infer_vit_config(sd, num_heads=num_heads)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a ViT checkpoint minivit reads: {exc}"
        ) from exc
    _check_declared(path, declared, inferred)
    if num_heads is None and "architecture" in hf:
        warnings.warn(
            f"{str(path)!r}: timm's config.json does not give the head count of "
            f"{hf['architecture']!r}, which is not a name minivit registers; using "
            f"{inferred['num_heads']}, the count timm's common configs give width "
            f"{inferred['embed_dim']}. Pass num_heads= if the model had another.",
            stacklevel=2,
        )
    # what config.json says that the shapes cannot, or say less neatly: HF's layernorm eps (its
    # ViT default is 1e-12), and the MLP ratio as given (the shapes give width / D)
    from_json = {k: declared[k][1] for k in ("eps", "mlp_ratio") if k in declared}
    cfg = {**inferred, **from_json, **overrides}
    model = ViT(**cfg, dtype=dtype or "float32", backend=backend)
    want = tuple(model.params["pos_embed"].shape)
    if tuple(sd["pos_embed"].shape) != want:
        # another image size (img_size=... given): resample the grid as timm does on load
        from .convert import resample_abs_pos_embed

        g = model.img_size // model.patch_size
        sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], (g, g))
    model.load_state_dict(sd, strict=True)
    return model, meta


def _hf_config_beside(path) -> dict:
    """The ``config.json`` beside a Hugging Face weights file, or {} when there is none."""
    cfg_json = Path(path).parent / "config.json"
    if not cfg_json.exists():
        return {}
    try:
        js = json.loads(cfg_json.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {str(cfg_json)!r}: {exc}") from exc
    if not isinstance(js, dict):
        raise CheckpointError(f"{str(cfg_json)!r} is not a JSON object")
    return js


# transformers' config.json names for ViT and ViLT settings (minivit's names as values): the
# first five are read off the weights' shapes too, the others leave no trace in them (where a
# file gives both head counts, num_attention_heads, the later, wins)
_HF_SHAPE_KEYS = {
    "num_hidden_layers": "depth",
    "hidden_size": "embed_dim",
    "intermediate_size": "mlp_width",  # compared with int(D * mlp_ratio)
    "patch_size": "patch_size",
    "num_channels": "in_chans",
    "vocab_size": "vocab_size",
}
_HF_OTHER_KEYS = {"num_heads": "num_heads", "num_attention_heads": "num_heads",
                  "layer_norm_eps": "eps"}  # fmt: skip

# timm's config.json, as timm writes it beside model.safetensors for the Hugging Face hub:
# "architecture" names the model, "model_args" holds the arguments it was built with beyond that
# name's own, and "num_classes", "num_features" (the width) and "global_pool" describe it.
# These model_args are minivit's ViT's own arguments under the same names:
_TIMM_ARGS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
              "num_heads", "mlp_ratio", "qkv_bias", "global_pool")  # fmt: skip
# these change nothing a forward computes from given weights (dropout, initialisation, a
# position embedding resized on the fly), or show in the names of the weights (fc_norm, through
# the pooling compared above):
_TIMM_HARMLESS = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate",
                  "drop_path_rate", "weight_init", "fix_init", "dynamic_img_size",
                  "dynamic_img_pad", "fc_norm")  # fmt: skip
# and these are timm's options that minivit's ViT does not have: harmless only at the values
# listed (timm's defaults, or their names)
_TIMM_DEFAULTS = {"class_token": (True,), "no_embed_class": (False,), "reg_tokens": (0,),
                  "pre_norm": (False,), "final_norm": (True,), "init_values": (None,),
                  "qk_norm": (False,), "proj_bias": (True,), "pos_embed": ("learn",),
                  "act_layer": (None, "gelu"), "norm_layer": (None,), "embed_layer": (None,),
                  "block_fn": (None,), "mlp_layer": (None,),
                  "strict_img_size": (True,)}  # fmt: skip
# what a registered name's config declares for the weights: not its image size, which timm
# changes on load by resampling the position embedding
_REGISTERED_ARGS = ("patch_size", "embed_dim", "depth", "num_heads")


def _declared_vit_config(path, js) -> dict:
    """What a ``config.json`` beside a ViT's weights declares: {minivit's argument name:
    (where the json says it, value)}, from transformers' format or from timm's (the registered
    config of its ``architecture`` when minivit knows the name, then its ``model_args``).
    Raises CheckpointError for a timm option that would make minivit compute something else
    from the same weights."""
    if "architecture" not in js:  # transformers' config (or none)
        act = js.get("hidden_act", "gelu")
        if act != "gelu":  # the activation leaves no trace in the weights
            raise CheckpointError(
                f"{str(path)!r}: config.json's hidden_act is {act!r}; minivit's ViT and ViLT "
                "compute the exact GELU ('gelu') only"
            )
        keys = {**_HF_SHAPE_KEYS, **_HF_OTHER_KEYS}
        declared = {name: (key, js[key]) for key, name in keys.items() if key in js}
        if "eps" in declared:
            declared["eps"] = (declared["eps"][0], float(declared["eps"][1]))
        return declared
    from .models.registry import list_models, model_config

    arch = js["architecture"]
    if not isinstance(arch, str):
        raise CheckpointError(f"{str(path)!r}: config.json's architecture is not a name")
    args = js.get("model_args")
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise CheckpointError(f"{str(path)!r}: config.json's model_args is not a JSON object")
    unsupported = [f"{k}={v!r}" for k, v in args.items() if not _timm_arg_understood(k, v)]
    if unsupported:
        raise CheckpointError(
            f"{str(path)!r}: timm built {arch!r} with {', '.join(unsupported)}, which minivit's "
            "ViT (timm's plain VisionTransformer) does not implement"
        )
    declared = {}
    for key in ("num_features", "num_classes", "global_pool"):  # the json's own description
        if key in js:
            declared["embed_dim" if key == "num_features" else key] = (key, js[key])
    if arch in list_models():  # timm's name for one of minivit's registered ViTs
        for k, v in model_config(arch).items():
            if k in _REGISTERED_ARGS:
                declared[k] = (f"{arch}'s {k}", v)
    for k, v in args.items():  # what it was built with beyond its name's own
        if k in _TIMM_ARGS:
            if k == "img_size" and isinstance(v, (list, tuple)):  # timm's (height, width)
                v = v[0] if len(set(v)) == 1 else tuple(v)
            declared[k] = (f"model_args.{k}", v)
    return declared


def _timm_arg_understood(key, value) -> bool:
    if key in _TIMM_ARGS or key in _TIMM_HARMLESS:
        return True
    return key in _TIMM_DEFAULTS and value in _TIMM_DEFAULTS[key]


def _mlp_width(cfg):
    """The MLP width a config gives: int(D * mlp_ratio), as timm sizes it (None: no blocks)."""
    return int(cfg["embed_dim"] * cfg["mlp_ratio"]) if "mlp_ratio" in cfg else None


def _check_declared(path, declared, cfg):
    """Refuse weights whose shapes disagree with the ``config.json`` beside them (``declared``
    as :func:`_declared_vit_config` gives it; ``cfg`` the config read off the shapes). The
    blocks are counted by their names, so a file that lost its last whole block would load as a
    shallower model without a word: its config says how many it should hold. So does a timm
    pooling that the names alone would misread (global_pool="avg" without fc_norm). An MLP
    ratio is compared as the width it gives."""
    wrong = []
    for name, (where, value) in declared.items():
        if name in ("mlp_ratio", "mlp_width"):
            width = _mlp_width(cfg)
            if width is None or not isinstance(value, (int, float)):
                continue
            said = int(cfg["embed_dim"] * value) if name == "mlp_ratio" else value
            if said != width:
                wrong.append(f"{where} is {value!r}, the weights give an MLP of {width}")
        elif name in cfg and name not in ("num_heads", "eps") and value != cfg[name]:
            wrong.append(f"{where} is {value!r}, the weights give {name}={cfg[name]!r}")
    if wrong:
        raise CheckpointError(
            f"{str(path)!r} does not match the config.json beside it: {'; '.join(wrong)} (an "
            "incomplete file, or another model's config)"
        )


def _load_hf_vilt(path, tensors, meta, declared, backend, dtype, num_heads, overrides):
    from .convert import from_hf_vilt, infer_vilt_config
    from .models.vilt import ViLT

    try:
        sd = from_hf_vilt(tensors)
        eps = declared["eps"][1] if "eps" in declared else 1e-12  # HF's ViLT default
        cfg = infer_vilt_config(sd, num_heads=num_heads, eps=eps)
    except (KeyError, ValueError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a ViLT checkpoint minivit reads: {exc}"
        ) from exc
    _check_declared(path, declared, cfg)
    model = ViLT(**{**cfg, **overrides}, dtype=dtype or "float32", backend=backend)
    try:
        missing, _ = model.load_state_dict(sd, strict=False)
    except ValueError as exc:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the model: {exc}") from exc
    heads = ("itm_score.", "mlm_score.", "vqa_classifier.")  # (VQA: asked for by num_vqa_labels)
    body = [k for k in missing if not k.startswith(heads)]
    if body:
        raise CheckpointError(f"checkpoint {str(path)!r} lacks ViLT weights: {', '.join(body)}")
    model.missing_heads = tuple(sorted({k.split(".")[0] for k in missing}))  # for save_model
    meta = dict(meta, missing_heads=list(model.missing_heads))
    return model, meta
