"""Hugging Face safetensors models: the names of `kfuse.io.safetensors_format` (one file),
`kfuse.io.hf_dir` (reading a model directory), `kfuse.io.hf_config` (its config.json)
and `kfuse.io.hf_writers` (writing one), gathered for the imports that name this module."""

from kfuse.io.atomic import remove_stale_outputs
from kfuse.io.hf_config import (CONFIG_FILE, LAYER_COUNT_KEYS, PER_LAYER_KEYS, check_config_layers,
                                config_num_layers, hf_config)
from kfuse.io.hf_dir import (INDEX_FILE, SINGLE_FILE, HFModel, LazyTensors, is_hf_dir, open_hf_dir,
                             read_hf_dir)
from kfuse.io.hf_writers import (AUX_PATTERNS, HFWriter, PlannedHFWriter, copy_aux_files,
                                 write_hf_dir)
from kfuse.io.safetensors_format import (SafetensorsFile, SafetensorsHeader, TensorEntry,
                                         read_safetensors_header, write_safetensors)

__all__ = [
    "TensorEntry", "SafetensorsHeader", "SafetensorsFile", "read_safetensors_header",
    "write_safetensors", "HFModel", "LazyTensors", "open_hf_dir", "read_hf_dir", "is_hf_dir",
    "HFWriter", "PlannedHFWriter", "remove_stale_outputs", "write_hf_dir", "copy_aux_files",
    "AUX_PATTERNS", "hf_config", "config_num_layers", "check_config_layers", "LAYER_COUNT_KEYS",
    "PER_LAYER_KEYS", "SINGLE_FILE", "INDEX_FILE", "CONFIG_FILE",
]
