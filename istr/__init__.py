"""istr: pure-PyTorch end-to-end instance segmentation with transformers and mask embeddings (ISTR)."""
from istr.codecs import MaskCodec, create_codec, list_codecs, load_codec
from istr.registry import Registry

__version__ = "0.1.0"
__all__ = ["MaskCodec", "Registry", "create_codec", "list_codecs", "load_codec", "__version__"]
