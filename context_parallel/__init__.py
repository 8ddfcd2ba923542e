"""Context parallelism (--context-parallel-size C): the C ranks of a group split every sequence between them.

Each holds two of 2C equal chunks, an early and a late one (rank r: chunks r and 2C - 1 - r), so causal attention
costs every rank alike. Attention gathers the keys and values of the whole sequence over the group (an all-gather,
as Llama 3's long-context training did, which keeps document masks and sliding windows exact: every query sees
its keys with their true positions); the backward sums the keys' and values' gradients back to their owners.
Rotary positions are the tokens' own. The loss of a rank covers its tokens; gradients are summed over the dp x cp
ranks of a stage like data parallelism's (comm.Layout.grad_group).
"""

from .attention import ContextMask, context_masks, gather_sequence
from .split import ContextSplit, attach_context

__all__ = ["ContextMask", "ContextSplit", "attach_context", "context_masks", "gather_sequence"]
