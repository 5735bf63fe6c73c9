"""The paper's digit experiment: Stable Diffusion 1.5 + LoRA on two digit groups at 4:1.

The reference code fine-tunes SD-1.5 on mixed MNIST pairs (0/1, 7/8) at 32x32 with a
prompt per image; here the digits are scikit-learn's embedded ones, written in the
reference format once:

python -m ddm_jax.cli.prepare_sd_digits --pair 0/1 --ratio 4:1     # -> ~/.cache/ddm_jax/sd_digits
python train.py --config=configs/sd15_digits.py --workdir=runs/sd_digits \
  --config.model.pretrained=/path/to/stable-diffusion-v1-5
python evaluate.py --workdir=runs/sd_digits --num_samples=200

Everything else is the published run (configs/sd15_lora.py): batch 1, accumulation 4,
4000 micro-batch steps, lr 1e-5 constant, clip by value 1.0, w_rec 0.95, w_ind 0.05,
LoRA r 8 / alpha 32 on the UNet's to_q/to_v and the text encoder's q_proj/v_proj,
sampling with PNDM, 40 steps, classifier-free guidance 7.5. Another pair, ratio or
folder: prepare_sd_digits prints the `--config.data.*` overrides to use.
"""
import os

from . import sd15_lora
from ddm_jax.data.reference_digits import DEFAULT_OUT, DEFAULT_PROMPT

DATA = os.path.expanduser(DEFAULT_OUT)  # where prepare_sd_digits writes without --out


def get_config():
  c = sd15_lora.get_config()
  c.data.image_dir = os.path.join(DATA, 'train', 'images')
  c.data.labels_file = os.path.join(DATA, 'train', 'labels.json')
  c.data.prompts_file = os.path.join(DATA, 'train', 'prompts.txt')
  c.data.heldout_dir = os.path.join(DATA, 'heldout')   # the evaluation's held-out `test` split
  c.data.prompt = DEFAULT_PROMPT          # the text prepare_sd_digits gives every image
  c.data.resolution = 32
  c.data.num_groups = 2
  return c
