"""Structured channel pruning: the analysis, the per-op handlers and the rewrite behind ``PruneChannels``.

* :mod:`.core` — the handler contract (:class:`ChannelHandler`: ``link`` + ``resize``), the registry
  keyed by op overload (:func:`register_channel_rule`, the :func:`channel_rule` decorator) and the
  link collector (:class:`Builder`) / pruned sizes (:class:`PrunedSizes`) a handler works with.
* :mod:`.handlers` (elementwise, layout, indexing, reductions), :mod:`.layers` (linear, conv, norms,
  embedding), :mod:`.views` (reshapes), :mod:`.attention` (sdpa, GQA repeats): one handler per op,
  registered where it is written; importing this package registers them all.
* :mod:`.graph` — channel spaces, classes, units and groups (what may be removed together, what is
  frozen and why); :mod:`.importance` — unit scores and selection; :mod:`.rewrite` — the checked
  rewrite; :mod:`.compensate` — data-aware importance and compensation.
"""

from fxcompress.passes.prune import attention, handlers, layers, views  # noqa: F401  (registers the handlers)
from fxcompress.passes.prune.core import Builder, ChannelHandler, PrunedSizes, channel_rule, register_channel_rule
from fxcompress.passes.prune.graph import ChannelGraph, analyze
from fxcompress.passes.prune.rewrite import apply_pruning, refusal

__all__ = [
    "Builder", "ChannelGraph", "ChannelHandler", "PrunedSizes", "analyze", "apply_pruning", "channel_rule",
    "refusal", "register_channel_rule",
]
