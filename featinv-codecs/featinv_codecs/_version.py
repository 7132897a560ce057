"""The distribution's version, and what a store's `compression.reader` attribute asks a reader to
install for arrays that use its codecs."""

VERSION = "0.2.0"  # 0.2.0: featinv.sparse
READER = (
    f"zarr-python >= 3.1 with featinv-codecs {VERSION} (numpy, numcodecs, zarr only): "
    "pip install ./featinv-codecs from featinv's repository, or its wheel"
)
