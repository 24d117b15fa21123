"""Built-in passes (imported as ``fxcompress.passes``). Importing this package registers them."""

from fxcompress.passes.eliminate_identity import EliminateIdentity
from fxcompress.passes.fold_bn import FoldBN

__all__ = ["EliminateIdentity", "FoldBN"]
