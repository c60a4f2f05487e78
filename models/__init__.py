"""SiT, DFM-SiT, ELIT-SiT and DFM-ELIT-SiT models, the name registry and checkpoint loading."""
from models.registry import MODEL_NAMES, create_model, is_elit, parse_name
from models.sit import SiT
from models.elit_sit import ELITSiT
from models.elit import budget_levels, latents_per_window
from models.checkpoints import (extract_state_dict, infer_arch, load_pretrained, load_state_dict_strict,
                                model_from_checkpoint, read_checkpoint)

__all__ = ["MODEL_NAMES", "create_model", "parse_name", "is_elit", "SiT", "ELITSiT", "budget_levels",
           "latents_per_window", "load_pretrained", "infer_arch",
           "extract_state_dict", "load_state_dict_strict", "read_checkpoint", "model_from_checkpoint"]
