"""Peak memory of loading an SD-1.5-sized UNet from a diffusers folder.

python benchmarks/load_memory.py [--folder runs/bench/sd15_random] [--readers ours,safe_open,torch]

Writes (once) a `unet/` folder with diffusers' SD-1.5 UNet config and random float32
weights (3.4 GB, numpy only), then loads it in a fresh process per reader and prints one
JSON line per reader: peak RSS, RSS before and after, seconds.
- `ours`: `ddm_jax.interop.diffusers.load_unet` as it is (plain reads, one tensor at a time);
- `safe_open`: the same conversion reading through safetensors' memory map (how
  load_unet read before; the mapped pages count in the process until the file is closed);
- `torch`: diffusers' `UNet2DConditionModel.from_pretrained` (the PyTorch user's load).
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks import memory  # noqa: E402


def write_folder(folder):
  """A diffusers `unet/` folder with the SD-1.5 config and random weights."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from benchmarks.sd_memory import SD15_UNET  # pylint: disable=import-outside-toplevel
  from ddm_jax.interop.diffusers import (  # pylint: disable=import-outside-toplevel
      _unet_inputs, expected_params, path_to_torch_key, _torch_shape)
  from ddm_jax.models.unet import unet_from_config  # pylint: disable=import-outside-toplevel
  unet_dir = os.path.join(folder, 'unet')
  weights = os.path.join(unet_dir, 'diffusion_pytorch_model.safetensors')
  if os.path.isfile(weights):
    return folder
  os.makedirs(unet_dir, exist_ok=True)
  module = unet_from_config(dict(SD15_UNET))
  rng = np.random.default_rng(0)
  state = {path_to_torch_key(p): rng.standard_normal(_torch_shape(p[-1], a.shape), np.float32)
           for p, a in expected_params(module, *_unet_inputs(module)).items()}
  with open(os.path.join(unet_dir, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump({'_class_name': 'UNet2DConditionModel', **SD15_UNET}, f)
  save_file(state, weights + '.tmp')
  os.replace(weights + '.tmp', weights)
  return folder


def load(reader, folder):
  """In this process: load with `reader`; returns the JSON-able result."""
  rss_before = memory.rss_mib()[0]
  t0 = time.perf_counter()
  if reader == 'torch':
    from diffusers import UNet2DConditionModel  # pylint: disable=import-outside-toplevel
    rss_before = memory.rss_mib()[0]
    t0 = time.perf_counter()
    model = UNet2DConditionModel.from_pretrained(folder, subfolder='unet')
    n = sum(p.numel() for p in model.parameters())
  else:
    import jax  # pylint: disable=import-outside-toplevel
    from ddm_jax.interop import diffusers  # pylint: disable=import-outside-toplevel
    rss_before = memory.rss_mib()[0]
    t0 = time.perf_counter()
    if reader == 'safe_open':
      diffusers._tensors = _safe_open_tensors  # pylint: disable=protected-access
    _, params = diffusers.load_unet(folder)
    n = sum(x.size for x in jax.tree_util.tree_leaves(params))
  rss_after, peak = memory.rss_mib()
  return {'reader': reader, 'params': int(n), 'weights_mib': round(n * 4 / memory.MIB),
          'rss_before_mib': round(rss_before), 'rss_after_mib': round(rss_after),
          'peak_rss_mib': round(peak), 'peak_over_before_mib': round(peak - rss_before),
          'seconds': round(time.perf_counter() - t0, 1)}


def _safe_open_tensors(files):
  """load_unet's former reader: safetensors' memory-mapped safe_open, one tensor at a time."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  by_file = {}
  for key, file in files.items():
    by_file.setdefault(file, []).append(key)
  for file, keys in by_file.items():
    with safe_open(file, framework='numpy') as f:
      for key in keys:
        yield key, file, (lambda k=key, f=f: f.get_tensor(k))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  ap.add_argument('--folder', default=os.path.join(REPO, 'runs', 'bench', 'sd15_random'))
  ap.add_argument('--readers', default='ours,safe_open,torch')
  ap.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = ap.parse_args(argv)
  if args.child:
    print('LOAD_RESULT ' + json.dumps(load(args.child, args.folder)), flush=True)
    return
  write_folder(args.folder)
  for reader in args.readers.split(','):
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), '--folder', args.folder,
                           '--child', reader], capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('LOAD_RESULT ')]
    result = json.loads(lines[0][12:]) if lines else {'reader': reader, 'error': proc.stderr[-1500:]}
    result['load_1min'] = round(os.getloadavg()[0], 2)
    print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main()
