"""Streaming, out-of-core execution of a merge plan over checkpoints.

A *plan* is a list of `TensorTask`s, one per output tensor, each naming its
input tensors by (model, name) and carrying its resolved parameters. Both the
mergekit-YAML runner and the native runner build plans. `execute` streams a
plan through three threads:

* **reader**: reads the inputs of the next tasks with positional reads
  (`HFModel.read_into`) into reusable page-aligned buffers; no memory maps,
  so the resident memory is the buffers, not the files. Integer and bool
  tensors are not merged: they are compared and copied here (`_agreed`);
* **main**: hands the buffers to XLA without a copy (or slices them over a
  device mesh, `kfuse.shard`), finds exact top-k cuts on the host for methods
  that trim (`select.find_cuts`), and dispatches the method's jit kernel,
  compiled once per (method, options, shape, dtype) and cached;
* **writer**: waits for each result, acts on its `FLAGS` (NaN/Inf inputs or
  results, values a down-cast would overflow), writes the result (e.g. `PlannedHFWriter.add`, straight to its place in its output
  shard) and recycles the input buffers.

Reading the next tensors, computing the current one and writing the previous
one overlap. Input buffers in flight are capped at ``prefetch_bytes`` (at
least one task), at most two results wait for the writer, so peak memory is
a small multiple of (experts + 2) × the largest tensor plus the runtime,
independent of the number of layers.


The package is split along its seams: `sources` (what is read), `plan` (tasks,
dtypes, chunks and segments), `buffers` (recycled host memory), `programs` (the
jitted kernels and their numeric flags), `cuts` (exact top-k cuts on the host)
and `scheduler` (`execute` and its threads).
"""

from kfuse.merge.engine.buffers import BufferPool
from kfuse.merge.engine.plan import TensorTask, output_specs, task_dtypes
from kfuse.merge.engine.programs import FLAGS
from kfuse.merge.engine.scheduler import (LOOKAHEAD, OVERFLOW, SEGMENT_CHUNKS, Stats,
                                          check_overflow, execute)
from kfuse.merge.engine.sources import DictSource, OrbaxSource, TensorSource, load_input

__all__ = ["BufferPool", "DictSource", "FLAGS", "LOOKAHEAD", "OVERFLOW", "OrbaxSource",
           "SEGMENT_CHUNKS", "Stats", "TensorSource", "TensorTask", "check_overflow", "execute",
           "load_input", "output_specs", "task_dtypes"]
