"""Reader-side codecs of featinv stores, without featinv: ``featinv.quantize``."""

from featinv_codecs.quantize import CODEC_NAME, READER, VERSION, QuantizeCodec, decode_array

__version__ = VERSION
__all__ = ["CODEC_NAME", "READER", "VERSION", "QuantizeCodec", "decode_array"]
