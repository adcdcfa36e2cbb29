"""Checkpoint I/O: HF safetensors directories, orbax pytrees, atomic outputs."""

from kfuse.io.atomic import (atomic_output_dir, atomic_write_bytes, atomic_write_text,
                             check_output_outside_inputs)
from kfuse.io.orbax_io import (
    is_orbax_checkpoint,
    load_params,
    orbax_metadata,
    restore_orbax,
    save_orbax,
)
from kfuse.io.safetensors_io import (
    HFModel,
    HFWriter,
    LazyTensors,
    PlannedHFWriter,
    SafetensorsFile,
    copy_aux_files,
    is_hf_dir,
    open_hf_dir,
    read_hf_dir,
    read_safetensors_header,
    remove_stale_outputs,
    write_hf_dir,
    write_safetensors,
)

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
    "copy_aux_files",
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
