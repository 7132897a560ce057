"""Reader-side codecs of featinv stores, without featinv: ``featinv.quantize`` (lossy arrays) and
``featinv.sparse`` (lossless arrays of mostly-zero maps, where a config allows it)."""

from featinv_codecs._version import READER, VERSION
from featinv_codecs.quantize import QuantizeCodec, decode_array
from featinv_codecs.sparse import Sparse, SparseCodec

__version__ = VERSION
__all__ = ["READER", "VERSION", "QuantizeCodec", "Sparse", "SparseCodec", "decode_array"]
