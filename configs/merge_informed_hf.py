"""RegMean / Fisher merge of HF causal-LM directories: statistics on calibration text, then a
streaming merge (safetensors in, safetensors out, atomic).

    python -m kfuse.main --config=configs/merge_informed_hf.py:regmean \
        --config.models=ft/a,ft/b --config.text_files=a.txt,b.txt --config.output_dir=out/rm

Each model's statistics (input Grams of every linear projection, or its diagonal
Fisher) are collected by running it in JAX on its text (one file per model, or one
for all), saved as Orbax checkpoints under ``stats_dir`` (rerun the merge without
the data: existing ones are reused), then the merge reads them one tensor at a time
(kfuse/merge/hf_statistics.py).
"""

import ml_collections

from kfuse.configs import merge_method_params, merge_param_docs, parse_arg


def get_config(arg=None):
  """``arg``: the method, regmean (default) or fisher."""
  method = parse_arg(arg, method="regmean").method
  config = ml_collections.ConfigDict()
  config.task = "merge_informed_hf"
  config.method = method
  config.models = ""            # comma-separated HF directories
  config.text_files = ""        # calibration text: one UTF-8 file per model, or one for all
  config.tokenizer = ""         # tokenizer.json or its directory; '' = each model's
  config.seq_len = 256          # tokens per calibration window
  config.batch_size = 8         # calibration windows per pass (Fisher: per-window gradients)
  config.max_tokens = 0         # use only the first N tokens of each text; 0 = all
  config.fisher_mode = "per_example"   # per_example | batch (FusionBench's cheaper variant)
  config.stats_dir = ""         # statistics checkpoints ('' = <output_dir>.stats); reused if there
  config.output_dir = ""        # the merged HF directory; never inside an input
  config.num_devices = 0         # >1: statistics and merge over this many devices (a 1-D mesh)
  config.overwrite = False      # replace output_dir and recollect the statistics
  config.progress = True        # progress lines on stderr
  config.params = merge_method_params(method)
  return config


def field_docs(arg=None):
  """One line per method parameter for `--help`."""
  return merge_param_docs(parse_arg(arg, method="regmean").method)
