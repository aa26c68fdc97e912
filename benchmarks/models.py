"""Whole-model benchmarks: forward and train step, minivit beside a PyTorch eager twin.

Models: ViT-Ti/16, ViT-S/16, ViT-B/16 at 224 (timm's configs), ViLT-B/32 (40 text tokens, one
384 x 384 image, the masked-attention path) and, minivit only, the small hybrid ViT; ViLT and the
hybrid are added only when their classes import.

Phases:
- ``forward``: inference; minivit ``forward(train=False)`` under ``minivit.no_grad()`` (no cache
  kept), torch under ``torch.no_grad()``.
- ``train_step``: forward, the loss, and the full backward (every parameter gradient).
  ViT: mean cross-entropy over random labels. ViLT: the pooled output against a fixed random
  gradient (``pooled.backward(g)``; minivit ``backward({"pooled": g})``).

The PyTorch twin is written in this file as plain eager code (``F.linear``, ``F.layer_norm``,
``F.gelu``, matmul + softmax attention, ``F.conv2d`` for the patches) and is loaded with the
minivit model's own parameters, so both compute the same function; the largest difference of
their outputs is recorded with every result (``twin_max_abs_diff``).
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness, report

MODEL_NAMES = ("vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vilt_b32")
EXTRA_MODELS = ("hybrid_resnet_small_32",)
SHORT = {
    "vit_tiny_patch16_224": "ViT-Ti/16",
    "vit_small_patch16_224": "ViT-S/16",
    "vit_base_patch16_224": "ViT-B/16",
    "vilt_b32": "ViLT-B/32",
    "hybrid_resnet_small_32": "Hybrid-R18s/32px",
}
TEXT_LEN = 40
# Idle seconds before each timed CPU run of a model (BenchConfig.gap_s, when None): longer than
# the ~0.1 s OpenBLAS's workers spin after a GEMM.
GAP_S = 0.12
VILT_IMG = 384


def batch_size(name: str, device: str, quick: bool) -> int:
    """Batch 8 on the CPU (the target case is ViT-Ti/16 at 8), 64 on a GPU."""
    if name.startswith("hybrid"):
        return 32 if device == "cpu" else 256
    return 8 if device == "cpu" else 64


def known_models() -> str:
    """The accepted model names, each with the label the report prints (an alias), for help
    texts and error messages: ``vit_tiny_patch16_224 (ViT-Ti/16), ...``."""
    return ", ".join(f"{m} ({SHORT[m]})" for m in MODEL_NAMES + EXTRA_MODELS)


def model_name(text: str) -> str | None:
    """A model's name from the name or its report label (``ViT-Ti/16``), case ignored; None for
    an unknown one."""
    for m in MODEL_NAMES + EXTRA_MODELS:
        if str(text).lower() in (m, SHORT[m].lower()):
            return m
    return None


def resolve_models(names, any_registered=False) -> list[str]:
    """``names`` (names or report labels) as model names, in the benchmark's order, each once;
    with ``any_registered``, other names of ``minivit.list_models()`` too, after those (the op
    profile and the perf breakdown build any registered model). Unknown names raise
    ``ValueError`` naming them all and listing the known ones."""
    from minivit import list_models

    registered = list_models() if any_registered else []
    unknown = [str(n) for n in names if model_name(n) is None and str(n) not in registered]
    if unknown:
        also = f"; or any of minivit.list_models(): {', '.join(registered)}" if registered else ""
        raise ValueError(
            f"unknown model{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for --models; known (name or report label): {known_models()}{also}"
        )
    wanted = {model_name(n) or str(n) for n in names}
    ours = [m for m in MODEL_NAMES + EXTRA_MODELS if m in wanted]
    return ours + [m for m in registered if m in wanted and m not in ours]


def model_list(cfg: harness.BenchConfig, device: str) -> list[str]:
    if cfg.models is not None:
        return resolve_models(cfg.models)
    if cfg.quick:
        if device == "cuda":
            return ["vit_tiny_patch16_224", "vit_base_patch16_224"]
        return ["vit_tiny_patch16_224"]
    return list(MODEL_NAMES + EXTRA_MODELS)


# ----------------------------------------------------------------------------------------------
# flop counts (GEMMs only, as a roofline numerator)


def encoder_flops(B, N, D, depth, mlp_ratio=4.0):
    """Forward FLOPs of ``depth`` pre-LN blocks: 2 M D (3D + D + 2 * hidden) + 4 B N^2 D each."""
    M = B * N
    hidden = int(D * mlp_ratio)
    return depth * (2.0 * M * D * (4 * D + 2 * hidden) + 4.0 * B * N * N * D)


def model_flops(model, name: str, B: int) -> float | None:
    """Forward GEMM FLOPs of one batch."""
    if name.startswith("hybrid"):
        return model.forward_flops(B)
    if name.startswith("vit"):
        Np, D = (model.img_size // model.patch_size) ** 2, model.embed_dim
        f = encoder_flops(B, Np + 1, D, model.depth, model.mlp_ratio)
        return f + input_layer_flops(model, name, B) + 2.0 * B * D * model.num_classes  # head
    if name.startswith("vilt"):
        Np, D = (VILT_IMG // model.patch_size) ** 2, model.embed_dim
        f = encoder_flops(B, TEXT_LEN + Np + 1, D, model.depth, model.mlp_ratio)
        return f + input_layer_flops(model, name, B) + 2.0 * B * D * D  # pooler
    return None


def input_layer_flops(model, name: str, B: int) -> float:
    """Forward FLOPs of the layer that reads the images: the patch embedding (ViT, ViLT), the
    stem convolution (hybrid). A train step skips its input gradient (no image gradient, on
    either side), so its backward is the weight gradient alone: one forward's worth, not two."""
    if name.startswith("hybrid"):
        return model.stem_flops(B)
    S = VILT_IMG if name.startswith("vilt") else model.img_size
    P = model.patch_size
    return 2.0 * B * (S // P) ** 2 * (model.in_chans * P * P) * model.embed_dim


def step_flops(model, name: str, B: int) -> dict:
    """GEMM FLOPs by phase: the forward, and a train step, which adds a backward of twice the
    forward's work (the input and the weight gradient of every GEMM) less the input gradient of
    the layer that reads the images, which neither side computes. None where not counted."""
    f = model_flops(model, name, B)
    step = None if f is None else 3 * f - input_layer_flops(model, name, B)
    return {"forward": f, "train_step": step}


# ----------------------------------------------------------------------------------------------
# the PyTorch twin


def _torch_twin(kind: str, params: dict, cfg: dict, device: str):
    """A torch.nn.Module computing the same function as the minivit model, with its weights."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.ParameterDict(
                {
                    k.replace(".", "__"): nn.Parameter(torch.tensor(np.asarray(v)))
                    for k, v in params.items()
                }
            )

        def w(self, name):
            return self.p[name.replace(".", "__")]

        def block(self, x, prefix, H, eps, mask=None):
            w = self.w
            B, N, D = x.shape
            hd = D // H
            h = F.layer_norm(x, (D,), w(prefix + "norm1.weight"), w(prefix + "norm1.bias"), eps)
            qkv = F.linear(h, w(prefix + "attn.qkv.weight"), w(prefix + "attn.qkv.bias"))
            q, k, v = qkv.reshape(B, N, 3, H, hd).permute(2, 0, 3, 1, 4)
            s = (q * hd**-0.5) @ k.transpose(-2, -1)  # (B, H, N, N)
            if mask is not None:
                s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
            a = torch.softmax(s, dim=-1)
            ctx = (a @ v).transpose(1, 2).reshape(B, N, D)
            x = x + F.linear(ctx, w(prefix + "attn.proj.weight"), w(prefix + "attn.proj.bias"))
            h = F.layer_norm(x, (D,), w(prefix + "norm2.weight"), w(prefix + "norm2.bias"), eps)
            h = F.gelu(F.linear(h, w(prefix + "mlp.fc1.weight"), w(prefix + "mlp.fc1.bias")))
            return x + F.linear(h, w(prefix + "mlp.fc2.weight"), w(prefix + "mlp.fc2.bias"))

        def forward_vit(self, images):
            w = self.w
            P = cfg["patch_size"]
            x = F.conv2d(images, w("patch_embed.proj.weight"), w("patch_embed.proj.bias"), P)
            x = x.flatten(2).transpose(1, 2)  # (B, Np, D)
            B, _, D = x.shape
            x = torch.cat([w("cls_token").expand(B, -1, -1), x], 1) + w("pos_embed")
            for i in range(cfg["depth"]):
                x = self.block(x, f"blocks.{i}.", cfg["num_heads"], cfg["eps"])
            x = F.layer_norm(x, (D,), w("norm.weight"), w("norm.bias"), cfg["eps"])
            return F.linear(x[:, 0], w("head.weight"), w("head.bias"))

        def forward_vilt(self, ids, text_mask, images):
            w = self.w
            P, D, L = cfg["patch_size"], cfg["embed_dim"], ids.shape[1]
            t = F.embedding(ids, w("text_embeddings.word_embeddings.weight"))
            t = t + w("text_embeddings.position_embeddings.weight")[:L]
            t = t + w("text_embeddings.token_type_embeddings.weight")[0]
            t = F.layer_norm(
                t,
                (D,),
                w("text_embeddings.LayerNorm.weight"),
                w("text_embeddings.LayerNorm.bias"),
                cfg["text_eps"],
            )
            t = t + w("token_type_embeddings.weight")[0]
            x = F.conv2d(
                images,
                w("transformer.patch_embed.proj.weight"),
                w("transformer.patch_embed.proj.bias"),
                P,
            )
            x = x.flatten(2).transpose(1, 2) + w("transformer.pos_embed")[0, 1:]
            B = x.shape[0]
            cls = w("transformer.cls_token")[0] + w("transformer.pos_embed")[0, :1]
            v = torch.cat([cls.expand(B, 1, D), x], 1) + w("token_type_embeddings.weight")[1]
            z = torch.cat([t, v], 1)
            mask = torch.cat(
                [text_mask, torch.ones(B, v.shape[1], dtype=torch.bool, device=z.device)], 1
            )
            for i in range(cfg["depth"]):
                z = self.block(z, f"transformer.blocks.{i}.", cfg["num_heads"], cfg["eps"], mask)
            z = F.layer_norm(
                z, (D,), w("transformer.norm.weight"), w("transformer.norm.bias"), cfg["eps"]
            )
            return torch.tanh(F.linear(z[:, 0], w("pooler.dense.weight"), w("pooler.dense.bias")))

    twin = Twin().to(device)
    twin.forward = twin.forward_vit if kind == "vit" else twin.forward_vilt
    return twin


# ----------------------------------------------------------------------------------------------
# building the cases


def build(name: str, backend: str, B: int, with_torch: bool, **overrides):
    """Returns dict(forward=..., train_step=..., torch_forward=..., torch_train_step=...,
    flops={phase: GEMM FLOPs}, twin_max_abs_diff=..., label=...) for one model on one
    backend. ``overrides`` replace entries of the model's config (``create_model``), for small
    test models."""
    import minivit
    from minivit import ops
    from minivit.backend import get_backend

    be = get_backend(backend)
    device = harness.torch_device(backend)
    rng = np.random.default_rng(0)
    out: dict = {}
    if name.startswith("vilt"):
        model = minivit.create_model("vilt_b32_mlm", backend=backend, dtype="float32", **overrides)
        kind = "vilt"
        ids = rng.integers(0, model.vocab_size, (B, TEXT_LEN))
        lengths = rng.integers(TEXT_LEN // 4, TEXT_LEN + 1, B)
        tmask = np.arange(TEXT_LEN)[None, :] < lengths[:, None]  # (B, L), padded captions
        images = rng.standard_normal((B, 3, VILT_IMG, VILT_IMG)).astype(np.float32)
        gpool = (rng.standard_normal((B, model.embed_dim)) * 0.1).astype(np.float32)
        m_ids, m_mask = be.asarray(ids), be.asarray(tmask)
        m_img, m_g = be.asarray(images), be.asarray(gpool)

        def fwd():
            with minivit.no_grad():
                return model.forward(m_ids, m_mask, m_img)["pooled"]

        def step():
            model.zero_grads()  # as the twin's step sets .grad = None
            model.forward(m_ids, m_mask, m_img, train=True)
            model.backward({"pooled": m_g}, input_grad=False)  # the twin's images need none

    else:
        model = minivit.create_model(name, backend=backend, dtype="float32", **overrides)
        kind = "vit" if name.startswith("vit") else "other"
        images = rng.standard_normal((B, model.in_chans, model.img_size, model.img_size))
        images = images.astype(np.float32)
        labels = rng.integers(0, model.num_classes, B)
        m_img, m_lab = be.asarray(images), be.asarray(labels)

        def fwd():
            with minivit.no_grad():
                return model.forward(m_img, train=False)

        def step():
            model.zero_grads()  # as the twin's step sets .grad = None
            logits = model.forward(m_img, train=True)
            _, c = ops.cross_entropy_forward(logits, m_lab)
            (dl,) = ops.cross_entropy_backward(be.xp.asarray(1.0, dtype=logits.dtype), c)
            model.backward(dl, input_grad=False)  # as the twin: images need no gradient

    out.update(forward=fwd, train_step=step, model=model, flops=step_flops(model, name, B))
    if with_torch and kind in ("vit", "vilt"):
        import torch
        import torch.nn.functional as F

        params = {k: be.to_numpy(v) for k, v in model.params.items()}
        twin = _torch_twin(kind, params, dict(model.config), device)
        if kind == "vilt":
            t_args = (
                torch.tensor(ids, device=device),
                torch.tensor(tmask, device=device),
                torch.tensor(images, device=device),
            )
            t_g = torch.tensor(gpool, device=device)

            def t_step():
                for p in twin.parameters():
                    p.grad = None
                twin(*t_args).backward(t_g)

        else:
            t_args = (torch.tensor(images, device=device),)
            t_lab = torch.tensor(labels, device=device)

            def t_step():
                for p in twin.parameters():
                    p.grad = None
                F.cross_entropy(twin(*t_args), t_lab).backward()

        def t_fwd():
            with torch.no_grad():
                return twin(*t_args)

        # The twin must compute the same function as the model.
        ref = be.to_numpy(fwd())
        got = t_fwd().detach().cpu().numpy()
        out["twin_max_abs_diff"] = float(np.abs(ref - got).max())
        out.update(torch_forward=t_fwd, torch_train_step=t_step)
    return out


def run(
    cfg: harness.BenchConfig, ceilings: dict | None = None, log=print, rows: list | None = None
) -> list[dict]:
    """Time every selected model's forward and train step on every backend and in torch.

    Rows are appended to ``rows`` (a new list by default) as each phase finishes, so a caller
    stopped part way (a device run's time limit) keeps them. A case that raises is logged and
    skipped: one failure must not cost a one-shot device run the other figures.
    """
    import importlib

    ceilings = ceilings or {}
    have_torch = cfg.torch and harness.impl_available("torch")
    rows = [] if rows is None else rows
    for backend in cfg.backends:
        if not harness.impl_available(backend):
            log(f"models: backend {backend} unavailable, skipped")
            continue
        device = harness.torch_device(backend)
        torch_ok = have_torch and (device == "cpu" or harness.torch_cuda())
        for name in model_list(cfg, device):
            mod = {"vilt": "minivit.models.vilt", "hybr": "minivit.models.hybrid"}.get(name[:4])
            if mod is not None:
                try:
                    importlib.import_module(mod)
                except ImportError as exc:
                    log(f"models: {name} skipped ({exc})")
                    continue
            B = batch_size(name, device, cfg.quick)
            built = None  # the last model's arrays go before this one is built
            harness.release_memory(device)
            try:
                built = build(name, backend, B, torch_ok)
            except Exception as exc:  # out of memory, say: skip, say so
                log(f"models: {name} on {backend} could not be built: {type(exc).__name__}: {exc}")
                rows.append(report.failure_row(name, "build", backend, exc))
                continue
            for phase in ("forward", "train_step"):
                try:
                    rows.extend(
                        _time_phase(cfg, name, backend, device, B, built, phase, ceilings, log)
                    )
                except Exception as exc:
                    log(f"models: {name} {phase} on {backend} failed: {type(exc).__name__}: {exc}")
                    rows.append(report.failure_row(name, phase, backend, exc))
                    harness.release_memory(device)
    return rows


def _time_phase(cfg, name, backend, device, B, built, phase, ceilings, log) -> list[dict]:
    """One model phase ("forward" or "train_step"), minivit beside its torch twin: its rows."""
    rows = []
    cases = {("minivit", phase): (built[phase], "minivit", device)}
    if f"torch_{phase}" in built:
        cases[("torch", phase)] = (built[f"torch_{phase}"], "torch", device)
    timed = harness.time_interleaved(
        cases, cfg.repeats, cfg.warmup, gap_s=GAP_S if cfg.gap_s is None else cfg.gap_s
    )
    fl = built["flops"][phase]
    for (impl, _), timing in timed.items():
        fn = cases[(impl, phase)][0]
        mem = harness.peak_memory(fn, impl, device) if cfg.memory else None
        base = dict(
            group="model",
            name=name,
            label=SHORT.get(name, name),
            phase=phase,
            backend=backend if impl == "minivit" else f"torch-{device}",
            impl=impl,
            device=device,
            dtype="float32",
            batch=B,
            shape=f"B={B}",
        )
        if "twin_max_abs_diff" in built:
            base["twin_max_abs_diff"] = built["twin_max_abs_diff"]
        row = harness.result_row(base, timing, fl, ceilings.get(harness.ceiling_key(base)), mem)
        rows.append(row)
    m = timed[("minivit", phase)]
    t = timed.get(("torch", phase))
    msg = f"  {backend:5s} {SHORT.get(name, name):16s} B={B:<3d} {phase:10s} "
    msg += f"{1e3 * m.median_s:9.1f} ms"
    if t:
        msg += f"  torch {1e3 * t.median_s:9.1f} ms  x{m.median_s / t.median_s:.3f}"
    log(msg)
    return rows
