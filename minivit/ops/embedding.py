"""Embedding lookup: ``out = table[ids]``.

Derivation: docs/ops/embedding.md.
"""

from __future__ import annotations

from ._common import Cache, backend_of, check_dout, check_float, check_int

__all__ = ["embedding_forward", "embedding_backward"]


def embedding_forward(ids, table):
    """ids int (...), table (V, D) -> out (..., D)."""
    check_int("ids", ids)
    check_float("table", table)
    if table.ndim != 2:
        raise ValueError(f"table must have shape (V, D), got {tuple(table.shape)}")
    be = backend_of(ids, table)
    V = table.shape[0]
    lo, hi = be.host_values(ids.min(), ids.max()) if ids.size else (0, 0)  # one read
    if ids.size and (lo < 0 or hi >= V):
        raise ValueError(
            f"ids must lie in [0, {V}) for a table of {V} rows, got values in [{lo}, {hi}]"
        )
    out = table[ids]  # (..., D)
    return out, Cache(ids=ids, table_shape=table.shape, dtype=table.dtype)


def embedding_backward(dout, cache):
    """Returns (dtable,): each row of dtable sums dout over the positions that used it."""
    ids = cache.ids
    out_shape = ids.shape + cache.table_shape[1:]  # (..., D)
    check_dout("embedding_backward", dout, out_shape, cache.dtype, type(ids))
    be = backend_of(dout)
    V, D = cache.table_shape
    dtable = be.xp.zeros((V, D), dtype=cache.dtype)
    be.scatter_add(dtable, ids.reshape(-1), dout.reshape(-1, D))  # repeated ids add up
    return (dtable,)
