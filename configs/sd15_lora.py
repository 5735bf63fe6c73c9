"""DDM on Stable Diffusion 1.5 with LoRA: the published example run.

python train.py --config=configs/sd15_lora.py --workdir=runs/sd \
  --config.model.pretrained=/path/to/stable-diffusion-v1-5 \
  --config.data.image_dir=IMAGES --config.data.labels_file=labels.json --config.data.prompts_file=prompts.txt

Resolution 32 (4x4 latents), batch 1, gradient accumulation 4, 4000 steps, lr 1e-5
constant, AdamW (0.9, 0.999, wd 1e-2, eps 1e-8), clip by value 1.0 on the running
accumulated gradient after every micro-step (optim.clip 'reference'), w_rec 0.95,
w_ind 0.05, UNet LoRA r 8 alpha 32 on to_q/to_v, text-encoder LoRA r 8 alpha 32 on
q_proj/v_proj, the indicator initialised as PyTorch's nn.Linear; the noise schedule
comes from the folder's scheduler config (SD 1.5: DDPM scaled_linear 0.00085 -> 0.012,
1000 steps, epsilon).
"""
import ml_collections

from . import digits


def get_config():
  c = digits.get_config()
  c.latent_factor = 8                    # the VAE's downsampling factor

  c.data.name = 'reference_folder'
  c.data.image_dir = ''
  c.data.labels_file = ''
  c.data.prompts_file = ''               # '' -> every image gets data.prompt
  c.data.prompt = 'A human face'
  c.data.resolution = 32
  c.data.channels = 3
  c.data.num_groups = 2
  c.data.groups = ()
  c.data.proportions = ()
  c.data.skip_bad = False                # skip unreadable images (listed in metadata.json)
  c.data.heldout_dir = ''                # held-out images/, labels.*, prompts.txt: evaluate.py's test split

  c.model = ml_collections.ConfigDict()
  c.model.pretrained = ''                # a local diffusers folder (model_index.json, unet/, vae/, ...)
  c.model.dtype = 'float32'              # 'bfloat16' computes in bf16, params stay float32
  c.model.remat = False                  # gradient checkpointing of the UNet blocks

  c.lora = ml_collections.ConfigDict()
  c.lora.unet_targets = ('to_q', 'to_v')
  c.lora.unet_rank = 8
  c.lora.unet_alpha = 32.0
  c.lora.train_text_encoder = True
  c.lora.text_targets = ('q_proj', 'v_proj')
  c.lora.text_rank = 8
  c.lora.text_alpha = 32.0
  c.lora.dropout = 0.0

  del c.diffusion                       # the schedule is the folder's scheduler_config.json

  c.loss.w_rec = 0.95
  c.loss.w_ind = 0.05

  c.optim.lr = 1e-5
  c.optim.schedule = 'constant'
  c.optim.warmup_steps = 0
  c.optim.clip = 'reference'            # by value on the running sum, after every micro-step
  c.optim.clip_value = 1.0
  c.optim.grad_accum = 4
  c.optim.weight_decay = 1e-2

  c.train.num_steps = 4000
  c.train.batch_size = 1
  c.train.ema_decay = 0.0               # the reference keeps no EMA
  c.train.log_every = 10
  c.train.checkpoint_every = 500
  c.train.sample_every = 0
  c.train.num_sample_images = 4

  c.sample.sampler = 'pndm'             # StableDiffusionPipeline's default for SD 1.x
  c.sample.steps = 40
  return c
