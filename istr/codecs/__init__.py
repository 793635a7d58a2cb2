"""Mask codecs: MaskCodec interface, registry, and the pca / autoencoder / dct / identity codecs."""
from istr.codecs.base import CODECS, MaskCodec, NotFittedError, create_codec, list_codecs, load_codec, register_codec
from istr.codecs import identity, dct, pca  # noqa: F401  (register the built-in codecs)

try:  # the autoencoder is registered when its module exists
    from istr.codecs import autoencoder  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover
    if exc.name != "istr.codecs.autoencoder":
        raise

__all__ = ["CODECS", "MaskCodec", "NotFittedError", "create_codec", "list_codecs", "load_codec", "register_codec"]
