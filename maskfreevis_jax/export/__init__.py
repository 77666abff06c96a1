"""maskfreevis_jax.export: weights both ways between Flax and the official PyTorch model.

export_checkpoint(variables, model_config, out_path, *, fmt='pth'|'safetensors',
                  eos_coef=0.1, iteration=0) -> ExportSummary
load_pretrained(path, variables, model_config=None) -> (variables, ImportReport)
"""

from maskfreevis_jax.export.torch_export import (
    ExportError,
    ExportSummary,
    export_checkpoint,
    export_state_dict,
    save_state_dict,
)
from maskfreevis_jax.export.torch_import import (
    CheckpointError,
    ImportReport,
    load_pretrained,
    load_state_dict_into_variables,
    normalize_official_keys,
    read_checkpoint,
)

__all__ = [
    "ExportError",
    "ExportSummary",
    "export_checkpoint",
    "export_state_dict",
    "save_state_dict",
    "CheckpointError",
    "ImportReport",
    "load_pretrained",
    "load_state_dict_into_variables",
    "normalize_official_keys",
    "read_checkpoint",
]
