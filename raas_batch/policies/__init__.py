"""KV policies, selected by name from one registry."""

from __future__ import annotations

from raas_batch.policies.base import DecodeContext, KVPolicy
from raas_batch.policies.dense import DensePolicy

POLICIES: dict[str, type[KVPolicy]] = {cls.name: cls for cls in (DensePolicy,)}


def make_policy(name: str, kv_budget: int | None = None, page_size: int = 16, **options) -> KVPolicy:
    """Build a policy by registry name; `options` are fields of that policy's config."""
    if name not in POLICIES:
        raise ValueError(f"kv_policy {name!r} is unknown; choose one of: {', '.join(sorted(POLICIES))}.")
    cls = POLICIES[name]
    if name != "dense" and kv_budget is None:
        raise ValueError(f"kv_policy {name!r} needs kv_budget (tokens kept per sequence, e.g. 1024).")
    if kv_budget is not None and kv_budget < 2 * page_size:
        raise ValueError(f"kv_budget {kv_budget} is below two pages of {page_size} tokens; raise it.")
    return cls(kv_budget=kv_budget, page_size=page_size, **options)


__all__ = ["POLICIES", "DecodeContext", "KVPolicy", "make_policy"]
