"""Sample from a trained DDM: python sample.py --workdir=DIR --num_samples=N [--sampler=ddim --steps=50 --seed=0]

A streamed, resumable job: PNGs as batches finish, .npz shards of --shard_size images and
a manifest (sampling.json) in --output; the same command again skips finished shards;
--num_hosts/--host_index split it over hosts that never talk to each other.

Stable Diffusion workdirs (config.model.pretrained): LoRA merged, PNDM 40 steps by default,
  python sample.py --workdir=DIR --num_samples=8 --prompt="A human face" [--prompt=... | "a;b"]
      [--negative_prompt=TEXT] [--cfg_scale=7.5] [--sampler=pndm|ddim|ddpm|dpm++2m --steps=40]
"""
import sys

from ddm_jax.cli.sample import main

if __name__ == '__main__':
  sys.exit(main())
