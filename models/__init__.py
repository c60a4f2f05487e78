"""SiT and DFM-SiT models, the name registry and checkpoint loading."""
from models.registry import MODEL_NAMES, create_model, parse_name
from models.sit import SiT
from models.checkpoints import (extract_state_dict, infer_arch, load_pretrained, load_state_dict_strict,
                                model_from_checkpoint, read_checkpoint)

__all__ = ["MODEL_NAMES", "create_model", "parse_name", "SiT", "load_pretrained", "infer_arch",
           "extract_state_dict", "load_state_dict_strict", "read_checkpoint", "model_from_checkpoint"]
