"""RaaS: Reasoning-Aware Attention Sparsity (Hu et al., ACL Findings 2025, arXiv 2502.11147), page-based.

Spec: docs/kv-policies.md. Per decode step, layer and KV head:
1. append the token to the current page and stamp it with the position (stamp on write);
2. score every retained page but the current one with the Quest bound
   s = sum_i max(q_i * kmax_i, q_i * kmin_i), max over the query heads of the group;
3. attend exactly over all retained pages (O(L));
4. refresh: the top floor((L/P)/2) scored pages get stamp = position (`refresh_rule="top_half"`), or
   those whose bound-estimated share of attention exceeds `alpha` (`refresh_rule="alpha"`). The decode
   step hands it to the attention op (`attention_refresh`); the Triton kernel runs it in the program
   that computed the row's bounds.
Eviction (when a new page is needed and all L/P slots are held): the unpinned page with the oldest
stamp, ties to the older page, never one of the last `recent_pages` completed pages. Prompt pages are
pinned with `pin_prompt` (the paper's setting; off by default here, `"auto"` pins a prompt that takes at
most half of the budget). Memory is O(L), reused.

Variants registered here:
- `raas`: the reading above (stamp on write, pinned pages kept out of the refresh by default, prompt
  not pinned by default).
- `raas-mass`: refresh the pages whose exact attention mass (emitted by the decode kernel: softmax
  probability summed over the page's tokens, max over the query group) exceeds `alpha`.
- `raas-paper`: the authors' public code: a page is stamped once, when it is opened, and pinned
  pages compete for the top-half refresh. Kept so that the benchmark can show the difference.

Options (dataclass fields, LLM(policy_options={...})): pin_prompt, refresh_pinned, recent_pages
(never evict the last W completed pages), dense_layers, refresh_rule, alpha. Defaults and the
evidence for them: README.md, "KV policies and fidelity".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from raas_batch.kernels.reference import Refresh
from raas_batch.policies.bounded import BoundedPolicy


@dataclass
class RaasPolicy(BoundedPolicy):
    # off (the paper pins; "auto" pins a prompt that takes at most half of the budget): on the 8 x 1,024
    # fidelity grid unpinned RaaS beat pinned and auto at every budget (README "Defaults")
    pin_prompt: bool | str = False
    refresh_pinned: bool = False  # pinned pages may take refresh slots (wasted: they are never evicted)
    recent_pages: int = 0  # never evict the last W completed pages (paper: 0)
    refresh_rule: str = "top_half"  # "top_half" | "alpha" (Quest bound) | "mass" (exact attention mass)
    alpha: float = 0.001

    name = "raas"

    def __post_init__(self):
        super().__post_init__()
        if self.refresh_rule not in ("top_half", "alpha", "mass"):
            raise ValueError(f"refresh_rule {self.refresh_rule!r} is unknown; choose top_half, alpha or mass.")
        if self.recent_pages < 0:
            raise ValueError(f"recent_pages must be >= 0, got {self.recent_pages}.")

    @property
    def needs_mass(self) -> bool:  # type: ignore[override]
        return self.refresh_rule == "mass"

    @property
    def uses_key_bounds(self) -> bool:  # type: ignore[override]
        return self.refresh_rule != "mass"

    @property
    def needs_bounds(self) -> bool:  # type: ignore[override]
        return self.refresh_rule != "mass"

    def decode_allowance(self) -> int:
        # At an eviction the decode pages hold distinct logical indices below the new page's; the
        # last `recent_pages` completed ones are protected, so one more than that must be held.
        return max(super().decode_allowance(), self.recent_pages + 1)

    def window_pages(self, sparse_pages: int, pinned_pages: int) -> int:
        return self.recent_pages + 1  # victims: logical <= newest completed page - recent_pages

    def attention_refresh(self, layer, ctx):
        """Refresh (RaaS's step 4) as the attention op's `refresh`: the refreshable pages (held, not the
        current one, unpinned unless refresh_pinned) chosen by the rule get stamp = position."""
        if layer < self.dense_layers:
            return None
        pool = self.pool
        return Refresh(self.cur[layer], ctx.slot_ids, ctx.positions, self.top, pool.pinned[layer],
                       pool.stamp[layer], pool.mass[layer], rule=self.refresh_rule,
                       refresh_pinned=self.refresh_pinned, alpha=self.alpha, scale=pool.head_dim ** -0.5)

    def after_attention(self, layer, q, ctx, page_ids, mass, bounds=None):
        """The refresh as its own `bounded_update` op (what `attention_refresh` hands the attention op)."""
        r = self.attention_refresh(layer, ctx)
        if r is not None:
            pool = self.pool
            # mass, or the Quest bounds the attention computed (None: the op scores the pages itself)
            r.run(self._ops().bounded_update, page_ids, mass if r.on_mass else bounds, pool.fill[layer],
                  q=q, kmin=pool.kmin[layer], kmax=pool.kmax[layer])


@dataclass
class RaasMassPolicy(RaasPolicy):
    """RaaS refreshed by exact attention mass > alpha (our extension; the paper's future work)."""

    refresh_rule: str = "mass"
    alpha: float = 0.001
    pin_prompt: bool | str = True  # the mass rule evicts a quiet prompt page that is needed later

    name = "raas-mass"


@dataclass
class RaasPaperPolicy(RaasPolicy):
    """The authors' reading: stamp a page once, when opened; pinned pages compete for the refresh."""

    refresh_pinned: bool = True
    pin_prompt: bool | str = True  # the paper pins the prompt

    name = "raas-paper"
    stamp_on_write: ClassVar[bool] = False
