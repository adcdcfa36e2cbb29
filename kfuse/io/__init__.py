"""Checkpoint I/O: HF safetensors directories, orbax pytrees, atomic outputs.

Modules: `safetensors_format` (one safetensors file), `hf_dir` (reading a HF model
directory), `hf_config` (its config.json), `hf_writers` (writing one), `orbax_io`,
`atomic` (all-or-nothing outputs).
"""

from kfuse.io.atomic import (atomic_output_dir, atomic_write_bytes, atomic_write_text,
                             check_output_outside_inputs, remove_stale_outputs)
from kfuse.io.orbax_io import (
    is_orbax_checkpoint,
    load_params,
    orbax_metadata,
    restore_orbax,
    save_orbax,
)
from kfuse.io.hf_config import check_config_layers, config_num_layers, hf_config
from kfuse.io.hf_dir import HFModel, LazyTensors, is_hf_dir, open_hf_dir, read_hf_dir
from kfuse.io.hf_writers import HFWriter, PlannedHFWriter, copy_aux_files, write_hf_dir
from kfuse.io.safetensors_format import SafetensorsFile, read_safetensors_header, write_safetensors

__all__ = [
    "atomic_output_dir",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_output_outside_inputs",
    "HFModel",
    "HFWriter",
    "LazyTensors",
    "PlannedHFWriter",
    "SafetensorsFile",
    "check_config_layers",
    "config_num_layers",
    "copy_aux_files",
    "hf_config",
    "is_hf_dir",
    "open_hf_dir",
    "read_hf_dir",
    "read_safetensors_header",
    "remove_stale_outputs",
    "write_hf_dir",
    "write_safetensors",
    "is_orbax_checkpoint",
    "load_params",
    "orbax_metadata",
    "restore_orbax",
    "save_orbax",
]
