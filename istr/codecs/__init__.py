"""Mask codecs: MaskCodec interface, registry, and the pca / autoencoder / dct / identity codecs."""
from istr.codecs.base import CODECS, MaskCodec, NotFittedError, create_codec, list_codecs, load_codec, register_codec
from istr.codecs import identity, dct, pca, autoencoder  # noqa: F401  (register the built-in codecs)

__all__ = ["CODECS", "MaskCodec", "NotFittedError", "create_codec", "list_codecs", "load_codec", "register_codec"]
