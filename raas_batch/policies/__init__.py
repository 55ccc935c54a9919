"""KV policies, selected by name from one registry.

dense (everything), raas / raas-mass / raas-paper (RaaS, arXiv 2502.11147), quest (arXiv 2406.10774),
h2o (arXiv 2306.14048), streaming (arXiv 2309.17453). `kv_budget` is in tokens per sequence;
options are the fields of the policy's dataclass (LLM(policy_options={...})). PolicyMixture runs
several of them in one engine (per sequence), for benchmarks.
"""

from __future__ import annotations

import dataclasses

from raas_batch.policies.base import DecodeContext, KVPolicy
from raas_batch.policies.dense import DensePolicy
from raas_batch.policies.h2o import H2OPolicy
from raas_batch.policies.mixture import PolicyMixture
from raas_batch.policies.quest import QuestPolicy
from raas_batch.policies.raas import RaasMassPolicy, RaasPaperPolicy, RaasPolicy
from raas_batch.policies.streaming import StreamingPolicy

POLICIES: dict[str, type[KVPolicy]] = {
    cls.name: cls
    for cls in (DensePolicy, RaasPolicy, RaasMassPolicy, RaasPaperPolicy, QuestPolicy, H2OPolicy, StreamingPolicy)
}


def make_policy(name: str, kv_budget: int | None = None, page_size: int = 16, **options) -> KVPolicy:
    """Build a policy by registry name; `options` are fields of that policy's config."""
    if name not in POLICIES:
        raise ValueError(f"kv_policy {name!r} is unknown; choose one of: {', '.join(sorted(POLICIES))}.")
    cls = POLICIES[name]
    if name != "dense" and kv_budget is None:
        raise ValueError(f"kv_policy {name!r} needs kv_budget (tokens kept per sequence, e.g. 1024).")
    if kv_budget is not None and kv_budget < 2 * page_size:
        raise ValueError(f"kv_budget {kv_budget} is below two pages of {page_size} tokens; raise it.")
    fields = {f.name for f in dataclasses.fields(cls)} - {"kv_budget", "page_size"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ValueError(f"kv_policy {name!r} has no option {', '.join(unknown)}; its options are: "
                         f"{', '.join(sorted(fields)) or 'none'}.")
    return cls(kv_budget=kv_budget, page_size=page_size, **options)


__all__ = ["POLICIES", "DecodeContext", "KVPolicy", "PolicyMixture", "make_policy"]
