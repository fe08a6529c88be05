"""packkv.ops: everything that touches bits.

The compressed format (``layout``, ``storage``, FORMAT.md), the pure-PyTorch reference codec and attention
(``quantize``, ``repack``, ``codec``, ``reference``), the Triton kernels (``kernels``), the torch.library ops
(``ops``) and size accounting (``accounting``). Importing this package registers the ``torch.ops.packkv`` ops.
"""

from . import ops  # noqa: F401  (registers torch.ops.packkv.*)
from .config import PackKVConfig
from .layout import Layout
from .storage import STORAGE_FIELDS, PackedLayer

__all__ = ["PackKVConfig", "Layout", "PackedLayer", "STORAGE_FIELDS"]
