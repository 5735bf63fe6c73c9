"""export.py: a trained Stable Diffusion DDM for PyTorch users (peft, diffusers, indicator)."""
import os
import sys

from ddm_jax.cli.common import cli, make_parser, parse, result
from ddm_jax.errors import ConfigError
from ddm_jax.files import check_writable_dir
from ddm_jax.interop.export import export_latent_ddm
from ddm_jax.training.setup import load_trained


def build_parser():
  p = make_parser('export', (
      'Export a trained Stable Diffusion DDM: peft LoRA adapters (UNet, text encoder), '
      "diffusers' pytorch_lora_weights.safetensors and the indicator as safetensors."))
  p.add_argument('--workdir', required=True, help='a train.py workdir (latest checkpoint)')
  p.add_argument('--output', required=True, help='folder to write')
  p.add_argument('--no_ema', action='store_true', help='export the raw instead of the EMA weights')
  return p


@cli
def main(argv):
  args = parse(build_parser(), argv)
  check_writable_dir(args.output)  # before the model loads and converts
  trained = load_trained(args.workdir, use_ema=not args.no_ema)
  if not trained.ddm.latent:
    raise ConfigError(f'{args.workdir} is a pixel-space DDM; export is for Stable Diffusion '
                      f'(LoRA) runs (config.model.pretrained)')
  written = export_latent_ddm(trained.ddm, trained.params, args.output, extra={
      'workdir': os.path.abspath(args.workdir), 'checkpoint_step': int(trained.step),
      'ema': not args.no_ema})
  result(f'wrote {", ".join(written)} to {os.path.abspath(args.output)}')


if __name__ == '__main__':
  sys.exit(main())
