"""Loading an HF Llama checkpoint into a device mesh: wall time and peak host RSS.

    python experiments/perf/hf_load_bench.py --size=1b --dtype=bfloat16 --devices=8 --fsdp=2 --tensor=4

Writes (once, under --root) a random Llama of experiments/perf/bench.py's ``--size`` with
numpy only, then, in this process with ``--devices`` fake CPU devices, times
``kfuse.models.hf.load(path, mesh=make_mesh(data, fsdp, tensor))`` and reads the peak
resident set size (VmHWM) before and after. On fake CPU devices the loaded parameters live
in host memory, so the floor is the checkpoint's size; the memory-mapped file pages read
are counted in RSS as well. Appends one JSON row to experiments/perf/hf_bench.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def vm_hwm() -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024
  return 0


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="1b")
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--data", type=int, default=1)
  ap.add_argument("--fsdp", type=int, default=2)
  ap.add_argument("--tensor", type=int, default=4)
  ap.add_argument("--root", default="/tmp/kfuse_perf")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "hf_bench.jsonl"))
  a = ap.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={a.devices}")
  sys.path.insert(0, os.path.dirname(__file__))
  import bench   # experiments/perf/bench.py: the random Llama writer
  path = bench.build_model(os.path.join(a.root, f"{a.size}_{a.dtype}_base"), a.size, a.dtype, 0)

  import jax
  import numpy as np
  from kfuse.io import open_hf_dir
  from kfuse.models import hf
  with open_hf_dir(path) as m:
    total = sum(m.nbytes(n) for n in m.names)
    largest = max(m.nbytes(n) for n in m.names)
  mesh = hf.make_mesh(data=a.data, fsdp=a.fsdp, tensor=a.tensor)
  jax.block_until_ready(jax.device_put(np.zeros(8), jax.devices()[0]))
  before = vm_hwm()
  t = time.perf_counter()
  model = hf.load(path, mesh=mesh)
  jax.block_until_ready(hf.to_hf_dict(model))
  wall = time.perf_counter() - t
  after = vm_hwm()
  row = dict(date=time.strftime("%Y-%m-%d"), what="load", size=a.size, dtype=a.dtype,
             devices=a.devices, mesh=dict(data=a.data, fsdp=a.fsdp, tensor=a.tensor),
             checkpoint_bytes=total, largest_tensor_bytes=largest, load_s=wall,
             peak_rss_before=before, peak_rss_after=after,
             peak_rss_increase_over_checkpoint=(after - before) / total, cpus=os.cpu_count())
  print(json.dumps(row))
  with open(a.out, "a") as f:
    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
  main()
