"""kfuse vs mergekit at LLM scale: build random HF-Llama models, merge them, compare, time.

    python experiments/perf/bench.py --size=136m --method=ties
    python experiments/perf/bench.py --size=136m --method=task_arithmetic --mergekit=off
    python experiments/perf/bench.py --size=1b --dtype=bfloat16 --method=ties --mergekit=off

One command:
1. builds ``--experts`` random HF-Llama-shaped models plus a base under
   ``--root`` (default /tmp/kfuse_perf; reused when already built). Base
   weights ~ N(0, 0.02), experts = base + N(0, 0.002). Written with numpy
   only: neither PyTorch nor transformers is needed to build them;
2. writes one mergekit YAML for ``--method`` and runs ``python -m kfuse.main``
   on it and, when installed (``--mergekit=auto``), ``mergekit-yaml`` on the
   same file, each under ``/usr/bin/time -v`` (wall time, peak RSS);
3. measures the I/O floor: reading every input file once plus writing (and
   fsync-ing) as many bytes as the output has, from the same page-cache state;
4. compares the two outputs tensor by tensor (relative error
   ``max|a-b| / max|b|``; counts of differing entries) and prints one JSON
   row, also appended to ``--results``. ``--repeat N`` alternates N runs of
   each tool and keeps each one's best; kfuse is also timed with a warm
   persistent compilation cache (``--config.compile_cache``).

Model files stay under ``--root``; never commit them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)

from kfuse import io as kio  # noqa: E402  (numpy-only safetensors I/O)
from kfuse.tree import resolve_dtype  # noqa: E402

SIZES = {
    # name: hidden, intermediate, layers, vocab, heads, kv_heads (Llama); arch="gpt2": GPT-2
    "tiny": dict(hidden=64, intermediate=176, layers=2, vocab=512, heads=4, kv_heads=4),
    "gpt2-64": dict(arch="gpt2", hidden=64, layers=2, vocab=50257, positions=1024),
    "gpt2-256": dict(arch="gpt2", hidden=256, layers=4, vocab=50257, positions=1024),
    "8m": dict(hidden=256, intermediate=688, layers=4, vocab=16384, heads=4, kv_heads=4),
    "30m": dict(hidden=512, intermediate=1408, layers=4, vocab=16384, heads=8, kv_heads=8),
    "136m": dict(hidden=768, intermediate=2048, layers=12, vocab=33280, heads=12, kv_heads=12),
    # subspace_rss.py: Llama-7B proportions (MLP 2.75 × hidden) at width 1024, 2 layers
    "llama-w1024": dict(hidden=1024, intermediate=2816, layers=2, vocab=2048, heads=8, kv_heads=8),
    "1b": dict(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4),
}

METHODS = {
    "ties": ("ties", "parameters: {{weight: 1.0, density: 0.2}}", "parameters: {{normalize: true}}"),
    "task_arithmetic": ("task_arithmetic", "parameters: {{weight: {w}}}", "parameters: {{lambda: 1.0}}"),
    "linear": ("linear", "parameters: {{weight: {w}}}", "parameters: {{normalize: true}}"),
    "slerp": ("slerp", None, "parameters: {{t: 0.5}}"),
    "breadcrumbs": ("breadcrumbs", "parameters: {{weight: 1.0, density: 0.2, gamma: 0.01}}", ""),
    "dare_ties": ("dare_ties", "parameters: {{weight: 1.0, density: 0.2}}", ""),
    "della": ("della", "parameters: {{weight: 1.0, density: 0.4}}", "parameters: {{epsilon: 0.1}}"),
    "karcher": ("karcher", "", ""),
    "sce": ("sce", "", "parameters: {{select_topk: 0.5}}"),
    "nuslerp": ("nuslerp", "parameters: {{weight: {w}}}", ""),
    "multislerp": ("multislerp", "parameters: {{weight: {w}}}", ""),
    "model_stock": ("model_stock", "", ""),
}
RANDOM = ("dare_ties", "della")   # outputs differ by the RNG: not compared
NO_BASE = ("karcher",)            # mergekit YAMLs without a base model
TWO_EXPERTS = ("nuslerp",)        # nuslerp merges exactly two models


def llama_shapes(hidden, intermediate, layers, vocab, heads, kv_heads):
  """HF Llama tensor names and shapes in file order (torch [out, in] layout)."""
  hd = hidden // heads
  shapes = {"model.embed_tokens.weight": (vocab, hidden)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (heads * hd, hidden),
        p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
        p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
        p + "self_attn.o_proj.weight": (hidden, heads * hd),
        p + "post_attention_layernorm.weight": (hidden,),
        p + "mlp.gate_proj.weight": (intermediate, hidden),
        p + "mlp.up_proj.weight": (intermediate, hidden),
        p + "mlp.down_proj.weight": (hidden, intermediate),
    })
  shapes["model.norm.weight"] = (hidden,)
  shapes["lm_head.weight"] = (vocab, hidden)
  return shapes


def gpt2_shapes(hidden, layers, vocab, positions, **_):
  """HF GPT-2 tensor names and shapes in file order (Conv1D [in, out] layout)."""
  h = hidden
  shapes = {"transformer.wte.weight": (vocab, h), "transformer.wpe.weight": (positions, h)}
  for i in range(layers):
    p = f"transformer.h.{i}."
    shapes.update({
        p + "ln_1.weight": (h,), p + "ln_1.bias": (h,),
        p + "attn.c_attn.weight": (h, 3 * h), p + "attn.c_attn.bias": (3 * h,),
        p + "attn.c_proj.weight": (h, h), p + "attn.c_proj.bias": (h,),
        p + "ln_2.weight": (h,), p + "ln_2.bias": (h,),
        p + "mlp.c_fc.weight": (h, 4 * h), p + "mlp.c_fc.bias": (4 * h,),
        p + "mlp.c_proj.weight": (4 * h, h), p + "mlp.c_proj.bias": (h,),
    })
  shapes["transformer.ln_f.weight"] = (h,)
  shapes["transformer.ln_f.bias"] = (h,)
  return shapes


def gpt2_config(hidden, layers, vocab, positions, dtype, **_):
  return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": hidden,
          "n_layer": layers, "n_head": max(1, hidden // 64), "vocab_size": vocab,
          "n_positions": positions, "n_ctx": positions, "tie_word_embeddings": True,
          "torch_dtype": dtype}


def model_shapes(size):
  cfg = dict(SIZES[size])
  return gpt2_shapes(**cfg) if cfg.pop("arch", "llama") == "gpt2" else llama_shapes(**cfg)


def model_config(size, dtype):
  cfg = dict(SIZES[size])
  arch = cfg.pop("arch", "llama")
  return gpt2_config(**cfg, dtype=dtype) if arch == "gpt2" else llama_config(**cfg, dtype=dtype)


def llama_config(hidden, intermediate, layers, vocab, heads, kv_heads, dtype):
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
      "num_attention_heads": heads, "num_key_value_heads": kv_heads, "vocab_size": vocab,
      "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "hidden_act": "silu",
      "tie_word_embeddings": False, "torch_dtype": dtype,
  }


def _rng(seed, name):
  return np.random.default_rng((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**32)


def _base_tensor(name, shape, seed):
  r = _rng(seed, name)
  if len(shape) == 1 and name.endswith("bias"):
    return 0.02 * r.standard_normal(shape, dtype=np.float32)
  if len(shape) == 1:
    return 1.0 + 0.05 * r.standard_normal(shape, dtype=np.float32)
  return 0.02 * r.standard_normal(shape, dtype=np.float32)


TIE_FREE_DENSITY = 0.2   # the density of the TIES / breadcrumbs YAMLs below


def _tie_free(base, x, density=TIE_FREE_DENSITY):
  """Make the top-k cut of ``|float32(x - base)|`` unambiguous for ``k = int(density·n)``.

  With |base| >> |delta|, float32 deltas are quantised to ulp(x), so a tensor
  of millions of entries always has several equal magnitudes at the k-th
  value. Which of those TIES keeps is then arbitrary in mergekit (an unstable
  argsort) while kfuse keeps the lowest indices. Moving just enough of the
  tied entries one ulp further from ``base`` puts the cut between two
  distinct magnitudes, so both tools must keep exactly the same entries.
  """
  n = x.size
  k = int(density * n)
  if not 0 < k < n:
    return x
  for _ in range(8):
    mag = np.abs(x - base)
    part = np.partition(mag, (n - k - 1, n - k))
    t_in, t_out = part[n - k], part[n - k - 1]     # smallest kept, largest dropped
    if t_in != t_out:
      return x
    above = int(np.count_nonzero(mag > t_in))
    tied = np.flatnonzero(mag == t_in)[:k - above]
    away = np.where(x[tied] >= base[tied], np.float32(np.inf), np.float32(-np.inf))
    x[tied] = np.nextafter(x[tied], away)
  raise RuntimeError("could not make the top-k cut tie-free")


def build_model(path, size, dtype, seed, expert=None):
  """Write one model (base when ``expert`` is None, else base + delta seeded by ``expert``).

  float32 experts get an unambiguous top-k cut at ``TIE_FREE_DENSITY`` (`_tie_free`).
  """
  marker = os.path.join(path, ".complete")
  spec = json.dumps({"size": size, "dtype": dtype, "seed": seed, "expert": expert,
                     "tie_free": TIE_FREE_DENSITY if dtype == "float32" else None})
  if os.path.exists(marker) and open(marker).read() == spec:
    return path
  shutil.rmtree(path, ignore_errors=True)
  np_dt = resolve_dtype(dtype)
  tmp = path + ".building"
  shutil.rmtree(tmp, ignore_errors=True)
  with kio.HFWriter(tmp, max_shard_bytes=2_000_000_000) as w:
    for name, shape in model_shapes(size).items():
      x = _base_tensor(name, shape, seed)
      if expert is not None:
        b = x.reshape(-1).copy()
        x += 0.002 * _rng(expert, name).standard_normal(shape, dtype=np.float32)
        if dtype == "float32":
          x = _tie_free(b, x.reshape(-1)).reshape(shape)
      w.add(name, x.astype(np_dt))
      del x
    w.finish(config=model_config(size, dtype))
  os.rename(tmp, path)
  with open(marker, "w") as f:
    f.write(spec)
  return path


def num_params(size):
  return sum(int(np.prod(s)) for s in model_shapes(size).values())


def write_yaml(path, method, base, experts, dtype, n_experts):
  mname, per_model, top = METHODS[method]
  lines = [f"merge_method: {mname}"] + ([] if method in NO_BASE else [f"base_model: {base}"])
  lines.append("models:")
  n_experts = 2 if method in TWO_EXPERTS else n_experts
  if method == "slerp":
    lines += [f"  - model: {base}", f"  - model: {experts[0]}"]
  else:
    if method == "linear":
      lines += [f"  - model: {base}", f"    parameters: {{weight: {1.0 / (n_experts + 1):.6f}}}"]
    for e in experts[:n_experts]:
      lines.append(f"  - model: {e}")
      if per_model:
        lines.append("    " + per_model.format(w=f"{1.0 / n_experts:.6f}"))
  if top:
    lines.append(top.format())
  lines.append(f"dtype: {dtype}")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


# --------------------------------------------------------------- measuring


def weight_files(model_dir):
  return sorted(os.path.join(model_dir, n) for n in os.listdir(model_dir)
                if n.endswith(".safetensors"))


def io_floor(inputs, out_bytes, scratch, chunk=64 << 20):
  """Seconds to read every input file once and write + fsync ``out_bytes``."""
  buf = bytearray(chunk)
  mv = memoryview(buf)
  t0 = time.perf_counter()
  for p in inputs:
    with open(p, "rb", buffering=0) as f:
      while f.readinto(mv):
        pass
  t_read = time.perf_counter() - t0
  out = os.path.join(scratch, "floor.bin")
  t1 = time.perf_counter()
  with open(out, "wb", buffering=0) as f:
    left = out_bytes
    while left > 0:
      n = min(left, chunk)
      f.write(mv[:n])
      left -= n
    os.fsync(f.fileno())
  t_write = time.perf_counter() - t1
  os.remove(out)
  return t_read + t_write, t_read, t_write


def timed(cmd, env=None):
  """Run ``cmd`` under /usr/bin/time -v; return (wall s, peak RSS GB, stdout+stderr, CPU s).

  CPU s is user + system time of the process and its children: on a shared machine
  it does not grow with other jobs' load the way wall time does."""
  full = ["/usr/bin/time", "-v"] + list(cmd)
  t0 = time.perf_counter()
  p = subprocess.run(full, capture_output=True, text=True, env=env)
  wall = time.perf_counter() - t0
  text = p.stdout + p.stderr
  if p.returncode != 0:
    raise RuntimeError(f"command failed ({p.returncode}): {' '.join(cmd)}\n{text[-4000:]}")
  m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
  rss = int(m.group(1)) / 1e6 if m else float("nan")
  cpu = sum(float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
  return wall, rss, text, cpu


def compare(a_dir, b_dir):
  """Per-tensor agreement of two HF outputs: worst relative error and mismatch counts."""
  worst, worst_name, mism, total = 0.0, None, 0, 0
  with kio.open_hf_dir(a_dir) as a, kio.open_hf_dir(b_dir) as b:
    if sorted(a.names) != sorted(b.names):
      raise RuntimeError(f"tensor names differ: {sorted(set(a.names) ^ set(b.names))[:3]}")
    for n in a.names:
      x, y = a.view(n), b.view(n)
      if x.shape != y.shape or x.dtype != y.dtype:
        raise RuntimeError(f"{n}: {x.shape}/{x.dtype} vs {y.shape}/{y.dtype}")
      x, y = x.astype(np.float32).ravel(), y.astype(np.float32).ravel()
      d = np.abs(x - y)
      rel = float(d.max() / max(float(np.abs(y).max()), 1e-12)) if d.size else 0.0
      mism += int(np.count_nonzero(d))
      total += d.size
      if rel > worst:
        worst, worst_name = rel, n
  return {"max_rel_err": worst, "worst_tensor": worst_name, "differing": mism, "numel": total}


def run_kfuse(yml, out, extra, env):
  cmd = [sys.executable, "-m", "kfuse.main", f"--config={REPO}/configs/mergekit.py:{yml}",
         f"--config.output_dir={out}", "--config.progress=False", "--config.overwrite=True"]
  wall, rss, log, _ = timed(cmd + extra, env)
  inner = json.loads([ln for ln in log.splitlines() if ln.startswith("{")][-1])["seconds"]
  return wall, rss, inner


def run_mergekit(yml, out, env):
  shutil.rmtree(out, ignore_errors=True)
  cmd = ["mergekit-yaml", yml, out, "--no-cuda", "--no-copy-tokenizer",
         "--no-write-model-card", "--random-seed", "0", "--quiet"]
  wall, rss, _, _ = timed(cmd, env)
  return wall, rss


# ------------------------------------------------------------------ matrix


def _spread(xs):
  """Median and (min, max) of a list, rounded: how a ratio of alternated pairs is reported."""
  xs = sorted(xs)
  return {"median": round(float(np.median(xs)), 2), "min": round(xs[0], 2),
          "max": round(xs[-1], 2), "pairs": [round(x, 2) for x in xs]}


def _kfuse_cmd(yml, out, cache):
  return [sys.executable, "-m", "kfuse.main", f"--config={REPO}/configs/mergekit.py:{yml}",
          f"--config.output_dir={out}", "--config.progress=False", "--config.overwrite=True",
          f"--config.compile_cache={cache}"]


def _mergekit_cmd(yml, out):
  return ["mergekit-yaml", yml, out, "--no-cuda", "--no-copy-tokenizer",
          "--no-write-model-card", "--random-seed", "0", "--quiet"]


def _result_line(log):
  return json.loads([ln for ln in log.splitlines() if ln.startswith("{")][-1])


def matrix(sizes, methods, repeat=3, root="/tmp/kfuse_perf", dtype="float32", experts=3,
           results=None, compare_outputs=True):
  """Model shapes × methods × {cold, warm} compilation cache, kfuse beside mergekit.

  Per (size, method) and per repeat, in this order: kfuse with an empty compilation
  cache (cold: a fresh directory), mergekit, kfuse with the cache the first cold run
  filled (warm). Both CPU time (user + sys) and wall time are kept; the ratios
  mergekit / kfuse are per alternated triple, reported as median (min, max).
  """
  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
  rows = []
  for size in sizes:
    mdir = os.path.join(root, f"{size}-{dtype}")
    os.makedirs(mdir, exist_ok=True)
    base = build_model(os.path.join(mdir, "base"), size, dtype, seed=1)
    exps = [build_model(os.path.join(mdir, f"expert{i}"), size, dtype, seed=1, expert=100 + i)
            for i in range(1, experts + 1)]
    for method in methods:
      work = tempfile.mkdtemp(prefix=f"mx-{method}-", dir=root)
      yml = write_yaml(os.path.join(work, "merge.yml"), method, base, exps, dtype, experts)
      k_out, m_out = os.path.join(work, "kfuse_out"), os.path.join(work, "mergekit_out")
      warm_cache = os.path.join(work, "xla_warm")
      runs = {"cold": [], "warm": [], "mergekit": []}
      load0 = os.getloadavg()[0]
      for r in range(repeat):
        cold_cache = warm_cache if r == 0 else os.path.join(work, f"xla_cold{r}")
        shutil.rmtree(k_out, ignore_errors=True)
        wall, rss, log, cpu = timed(_kfuse_cmd(yml, k_out, cold_cache), env)
        res = _result_line(log)
        runs["cold"].append((wall, cpu, rss, res["seconds"], res))
        shutil.rmtree(m_out, ignore_errors=True)
        wall, rss, _, cpu = timed(_mergekit_cmd(yml, m_out), env)
        runs["mergekit"].append((wall, cpu, rss))
        shutil.rmtree(k_out, ignore_errors=True)
        wall, rss, log, cpu = timed(_kfuse_cmd(yml, k_out, warm_cache), env)
        res = _result_line(log)
        runs["warm"].append((wall, cpu, rss, res["seconds"], res))
        if r:
          shutil.rmtree(cold_cache, ignore_errors=True)
      mk = runs["mergekit"]
      row = {"size": size, "params_M": round(num_params(size) / 1e6, 2), "dtype": dtype,
             "method": method, "experts": experts, "repeat": repeat, "cores": os.cpu_count(),
             "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)]}
      for k in ("cold", "warm"):
        kr = runs[k]
        row[f"kfuse_{k}_cpu"] = [round(x[1], 2) for x in kr]
        row[f"kfuse_{k}_wall"] = [round(x[0], 2) for x in kr]
        row[f"kfuse_{k}_merge_s"] = [round(x[3], 2) for x in kr]
        for t in ("startup_s", "startup_cpu_s", "first_tensor_s", "first_tensor_cpu_s"):
          row[f"kfuse_{k}_{t}"] = [x[4].get(t) for x in kr]
        row[f"cpu_ratio_{k}"] = _spread([m[1] / x[1] for m, x in zip(mk, kr)])
        row[f"wall_ratio_{k}"] = _spread([m[0] / x[0] for m, x in zip(mk, kr)])
      row["mergekit_cpu"] = [round(x[1], 2) for x in mk]
      row["mergekit_wall"] = [round(x[0], 2) for x in mk]
      row["kfuse_rss_GB"] = round(max(x[2] for x in runs["cold"]), 3)
      row["mergekit_rss_GB"] = round(max(x[2] for x in mk), 3)
      if compare_outputs and method not in RANDOM:
        row.update(compare(k_out, m_out))
      print(f"{size} {method}: cpu mergekit/kfuse cold {row['cpu_ratio_cold']['median']}x"
            f" {row['cpu_ratio_cold']['pairs']}, warm {row['cpu_ratio_warm']['median']}x"
            f" {row['cpu_ratio_warm']['pairs']} | kfuse cold cpu {row['kfuse_cold_cpu']},"
            f" warm {row['kfuse_warm_cpu']}, mergekit {row['mergekit_cpu']}"
            f" | rel.err {row.get('max_rel_err', '-')}", flush=True)
      rows.append(row)
      if results:
        with open(results, "a") as f:
          f.write(json.dumps(row) + "\n")
      shutil.rmtree(work, ignore_errors=True)
  return rows


def table(path):
  """The matrix rows of ``path`` (jsonl) as a markdown table (medians; ratios: median (min–max))."""
  med = lambda xs: float(np.median([x for x in xs if x is not None]))
  out = ["| shape | method | kfuse CPU s cold / warm | mergekit CPU s | mergekit / kfuse CPU,"
         " cold | ... warm | wall ratio cold / warm | kfuse CPU s to engine start / first"
         " tensor (warm) | peak RSS kfuse / mergekit GB | agreement (max rel. err) |",
         "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
  for line in open(path):
    r = json.loads(line)
    rc, rw = r["cpu_ratio_cold"], r["cpu_ratio_warm"]
    agree = (f"{r['max_rel_err']:.1e}" if "max_rel_err" in r else "random (not compared)")
    out.append(
        f"| {r['size']} ({r['params_M']}M) | {r['method']} |"
        f" {med(r['kfuse_cold_cpu']):.1f} / {med(r['kfuse_warm_cpu']):.1f} |"
        f" {med(r['mergekit_cpu']):.1f} |"
        f" **{rc['median']:.2f}×** ({rc['min']:.2f}–{rc['max']:.2f}) |"
        f" **{rw['median']:.2f}×** ({rw['min']:.2f}–{rw['max']:.2f}) |"
        f" {r['wall_ratio_cold']['median']:.2f}× / {r['wall_ratio_warm']['median']:.2f}× |"
        f" {med(r['kfuse_warm_startup_cpu_s']):.2f} / {med(r['kfuse_warm_first_tensor_cpu_s']):.2f} |"
        f" {r['kfuse_rss_GB']:.2f} / {r['mergekit_rss_GB']:.2f} | {agree} |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="136m", choices=sorted(SIZES))
  ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
  ap.add_argument("--method", default="ties", choices=sorted(METHODS))
  ap.add_argument("--experts", type=int, default=3)
  ap.add_argument("--root", default="/tmp/kfuse_perf")
  ap.add_argument("--mergekit", default="auto", choices=["auto", "on", "off"])
  ap.add_argument("--repeat", type=int, default=1, help="runs of each tool; the best is kept")
  ap.add_argument("--kfuse-args", default="", help="extra --config.X=Y flags for kfuse")
  ap.add_argument("--results", default=os.path.join(REPO, "experiments/perf/results.jsonl"))
  ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
  ap.add_argument("--matrix", default="", help="SIZES:METHODS, comma lists (e.g."
                  " gpt2-256,8m:karcher,sce): shapes x methods x cold/warm cache, median of"
                  " pairs, rows to --results (default matrix_results.jsonl)")
  ap.add_argument("--table", default="", help="print the matrix rows of this jsonl as markdown")
  args = ap.parse_args(argv)
  if args.table:
    print(table(args.table))
    return None
  if args.matrix:
    sizes, _, methods = args.matrix.partition(":")
    res = args.results
    if res == ap.get_default("results"):
      res = os.path.join(REPO, "experiments/perf/matrix_results.jsonl")
    return matrix(sizes.split(","), methods.split(","), repeat=args.repeat, root=args.root,
                  dtype=args.dtype, experts=args.experts, results=res)

  mdir = os.path.join(args.root, f"{args.size}-{args.dtype}")
  os.makedirs(mdir, exist_ok=True)
  t0 = time.perf_counter()
  base = build_model(os.path.join(mdir, "base"), args.size, args.dtype, seed=1)
  experts = [build_model(os.path.join(mdir, f"expert{i}"), args.size, args.dtype, seed=1,
                         expert=100 + i) for i in range(1, args.experts + 1)]
  print(f"models ready in {time.perf_counter() - t0:.1f}s ({num_params(args.size) / 1e6:.1f}M"
        f" params each, {args.dtype})", flush=True)

  work = tempfile.mkdtemp(prefix=f"run-{args.method}-", dir=args.root)
  yml = write_yaml(os.path.join(work, "merge.yml"), args.method, base, experts, args.dtype,
                   args.experts)
  used = [base] + (experts[:1] if args.method == "slerp" else experts)
  inputs = [f for m in used for f in weight_files(m)]
  in_bytes = sum(os.path.getsize(f) for f in inputs)
  out_bytes = sum(os.path.getsize(f) for f in weight_files(base))
  io_floor(inputs, out_bytes, work)  # warm the page cache: every run below starts from it
  floor, f_read, f_write = min(io_floor(inputs, out_bytes, work) for _ in range(2))
  print(f"I/O floor {floor:.2f}s (read {in_bytes / 1e9:.2f} GB in {f_read:.2f}s,"
        f" write {out_bytes / 1e9:.2f} GB in {f_write:.2f}s)", flush=True)

  env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=REPO)
  k_out, m_out = os.path.join(work, "kfuse_out"), os.path.join(work, "mergekit_out")
  extra = args.kfuse_args.split()
  if not any(a.startswith("--config.compile_cache") for a in extra):
    extra.append("--config.compile_cache=off")   # these runs compile (the cache is on by default)
  have_mk = shutil.which("mergekit-yaml") is not None
  use_mk = args.mergekit == "on" or (args.mergekit == "auto" and have_mk)
  k_runs, m_runs = [], []
  load0 = os.getloadavg()[0]
  for _ in range(args.repeat):   # alternate, so both tools see the same machine
    shutil.rmtree(k_out, ignore_errors=True)   # as for mergekit: no old output held
    k_runs.append(run_kfuse(yml, k_out, extra, env))
    print(f"kfuse: {k_runs[-1][0]:.2f}s wall ({k_runs[-1][2]:.2f}s merging),"
          f" peak RSS {k_runs[-1][1]:.2f} GB", flush=True)
    if use_mk:
      m_runs.append(run_mergekit(yml, m_out, env))
      print(f"mergekit: {m_runs[-1][0]:.2f}s wall, peak RSS {m_runs[-1][1]:.2f} GB", flush=True)
  cache = os.path.join(work, "xla_cache")
  run_kfuse(yml, k_out, extra + [f"--config.compile_cache={cache}"], env)
  shutil.rmtree(k_out, ignore_errors=True)
  warm = run_kfuse(yml, k_out, extra + [f"--config.compile_cache={cache}"], env)
  print(f"kfuse, warm compilation cache: {warm[0]:.2f}s wall", flush=True)
  k_wall, k_rss, k_inner = min(k_runs)
  n_in = 1 if args.method == "slerp" else args.experts
  largest = max(int(np.prod(sh)) for sh in model_shapes(args.size).values())
  itemsize = np.dtype(resolve_dtype(args.dtype)).itemsize
  row = {"size": args.size, "params_M": round(num_params(args.size) / 1e6, 1),
         "dtype": args.dtype, "method": args.method, "experts": n_in,
         "in_GB": round(in_bytes / 1e9, 3), "out_GB": round(out_bytes / 1e9, 3),
         "floor_s": round(floor, 2), "kfuse_s": round(k_wall, 2),
         "kfuse_merge_s": round(k_inner, 2), "kfuse_warm_s": round(warm[0], 2),
         "kfuse_rss_GB": round(k_rss, 2),
         "kfuse_GBps": round((in_bytes + out_bytes) / 1e9 / k_wall, 2),
         "x_floor": round(k_wall / floor, 2), "x_floor_merge": round(k_inner / floor, 2),
         "rss_bound_GB": round((n_in + 2) * largest * itemsize / 1e9 + 1.0, 2),
         "kfuse_args": args.kfuse_args, "cores": os.cpu_count(), "repeat": args.repeat,
         "loadavg": [round(load0, 2), round(os.getloadavg()[0], 2)],
         "kfuse_walls": [round(r[0], 2) for r in k_runs]}
  if m_runs:
    m_wall, m_rss = min(m_runs)
    cmp_ = compare(k_out, m_out)
    print(f"agreement: {cmp_}", flush=True)
    row.update({"mergekit_s": round(m_wall, 2), "mergekit_rss_GB": round(m_rss, 2),
                "mergekit_walls": [round(r[0], 2) for r in m_runs],
                "speedup": round(m_wall / k_wall, 2), "rss_ratio": round(k_rss / m_rss, 3),
                "speedup_per_pair": [round(m[0] / k[0], 2) for k, m in zip(k_runs, m_runs)],
                **cmp_})
  print(json.dumps(row), flush=True)
  with open(args.results, "a") as f:
    f.write(json.dumps(row) + "\n")
  if not args.keep:
    shutil.rmtree(work, ignore_errors=True)
  return row


if __name__ == "__main__":
  main()
