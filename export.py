"""Export a trained Stable Diffusion DDM for PyTorch: python export.py --workdir=DIR --output=OUT

Writes peft LoRA adapters (OUT/unet_lora, OUT/text_encoder_lora), diffusers'
OUT/pytorch_lora_weights.safetensors and OUT/indicator.safetensors (+ indicator.json);
see ddm_jax/interop/export.py.
"""
import sys

from ddm_jax.cli.export import main

if __name__ == '__main__':
  sys.exit(main())
