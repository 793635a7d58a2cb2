"""istr: pure-PyTorch end-to-end instance segmentation with transformers and mask embeddings (ISTR)."""
from istr.codecs import MaskCodec, create_codec, list_codecs, load_codec
from istr.registry import Registry
from istr.models import ISTR, create_model, list_models, load_model, save_model

__version__ = "0.1.0"
__all__ = ["ISTR", "MaskCodec", "Registry", "create_codec", "create_model", "list_codecs", "list_models", "load_codec",
           "load_model", "save_model", "__version__"]
