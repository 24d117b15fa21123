"""Built-in passes (imported as ``fxcompress.passes``). Importing this package registers them."""

from fxcompress.passes.eliminate_identity import EliminateIdentity
from fxcompress.passes.fold_bn import FoldBN
from fxcompress.passes.int8 import Int8, Int8Dynamic, Int8Static, Int8WeightOnly
from fxcompress.passes.low_rank import LowRank
from fxcompress.passes.prune import ChannelHandler, register_channel_rule
from fxcompress.passes.prune_channels import PruneChannels

__all__ = ["ChannelHandler", "EliminateIdentity", "FoldBN", "Int8", "Int8Dynamic", "Int8Static", "Int8WeightOnly", "LowRank",
           "PruneChannels", "register_channel_rule"]
