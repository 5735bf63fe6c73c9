from ddm_jax.models.indicator import Indicator
from ddm_jax.models.text_encoder import CLIPTextModel, text_encoder_from_config
from ddm_jax.models.tokenizer import CLIPTokenizer
from ddm_jax.models.unet import UNet2DConditionModel, unet_from_config
from ddm_jax.models.vae import AutoencoderKL, vae_from_config
