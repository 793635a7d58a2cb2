"""istr: pure-PyTorch end-to-end instance segmentation with transformers: ISTR (mask embeddings) and ISDA."""
from istr.codecs import MaskCodec, create_codec, list_codecs, load_codec
from istr.io import load_model, register_architecture, save_model
from istr.registry import Registry
from istr.models import ISDA, ISTR, create_model, list_models

__version__ = "0.1.0"
__all__ = ["ISDA", "ISTR", "MaskCodec", "Registry", "create_codec", "create_model", "list_codecs", "list_models", "load_codec",
           "load_model", "register_architecture", "save_model", "__version__"]
