"""Reading and writing files safely: weights (safetensors, weights-only pickles, HF folders),
images, the recipe in PNG / JPEG / WebP files and Hub downloads. See docs/files.md for what loads and what is refused.
"""

from __future__ import annotations

from diffstudio.io.download import download
from diffstudio.io.folders import (
    component_files,
    existing_path,
    read_component,
    read_component_config,
    read_model_index,
)
from diffstudio.io.images import images_to_tensor, load_image, load_mask, tensor_to_images
from diffstudio.io.pickle_checkpoint import load_pickle_checkpoint, unwrap_state_dict
from diffstudio.io.recipe import a1111_parameters, parse_a1111_parameters, read_recipe, save_image, save_png
from diffstudio.io.safetensors_file import (
    LazySafetensors,
    decode_metadata_value,
    load_safetensors,
    read_safetensors_header,
    save_safetensors,
)
from diffstudio.io.state_dict import file_format, read_file_metadata, read_state_dict, read_state_dict_meta

__all__ = [
    "LazySafetensors",
    "a1111_parameters",
    "component_files",
    "decode_metadata_value",
    "download",
    "existing_path",
    "file_format",
    "images_to_tensor",
    "load_image",
    "load_mask",
    "load_pickle_checkpoint",
    "load_safetensors",
    "parse_a1111_parameters",
    "read_component",
    "read_component_config",
    "read_file_metadata",
    "read_model_index",
    "read_recipe",
    "read_safetensors_header",
    "read_state_dict",
    "read_state_dict_meta",
    "save_image",
    "save_png",
    "save_safetensors",
    "tensor_to_images",
    "unwrap_state_dict",
]
