"""DDM on the embedded, biased scikit-learn digits (the default demo).

Group 0 = digit 0, group 1 = digit 1, trained at 80:20; the UNet is small and
unconditional (no cross-attention), the indicator is the reference MLP.
"""
import ml_collections


def get_config():
  c = ml_collections.ConfigDict()

  c.data = ml_collections.ConfigDict()
  c.data.name = 'biased_digits'          # a TFDS builder name; ours or any registered one
  c.data.data_dir = ''                   # '' -> $DDM_DATA_DIR or ~/.cache/ddm_jax/data
  c.data.split = 'train'
  c.data.image_key = 'image'
  c.data.label_key = 'label'             # group label feature, e.g. 'attributes/Male' for celeb_a
  c.data.groups = ((0,), (1,))           # biased_digits: digit classes forming each group
  c.data.proportions = (0.8, 0.2)        # biased_digits: share of each group in the training set
  c.data.class_filter = ()               # generic TFDS: keep only these label values ('' = all)
  c.data.group_ratio = ()                # generic TFDS: subsample to this group ratio
  c.data.resolution = 8                  # images are resized to resolution x resolution
  c.data.channels = 1
  c.data.num_groups = 2
  c.data.shuffle_seed = 0
  c.data.pseudo_labels = ''              # 'kmeans': replace group labels by k-means clusters
  c.data.pseudo_pca_dims = 16            # pseudo-labels: PCA dims of the pixel features

  c.model = ml_collections.ConfigDict()
  c.model.sample_size = 8
  c.model.in_channels = 1
  c.model.out_channels = 1
  c.model.block_out_channels = (32, 64)
  c.model.layers_per_block = 1
  c.model.down_block_types = ('DownBlock2D', 'AttnDownBlock2D')
  c.model.up_block_types = ('AttnUpBlock2D', 'UpBlock2D')
  c.model.mid_block_type = 'UNetMidBlock2D'
  c.model.attention_head_dim = 8
  c.model.cross_attention_dim = 0        # 0: no text/context input
  c.model.norm_num_groups = 8
  c.model.flip_sin_to_cos = True
  c.model.freq_shift = 0
  c.model.num_class_embeds = 0           # >0: group-conditioned UNet (for SPD)
  c.model.dtype = 'float32'              # compute dtype; params stay float32
  c.model.remat = False

  c.indicator = ml_collections.ConfigDict()
  c.indicator.hidden = (1024, 512)
  c.indicator.input = 'eps'              # 'eps': the UNet's predicted noise (DDM); 'x_t': the
                                         # noisy input and t (a noise-aware classifier)
  c.indicator.init = 'torch'             # 'torch': nn.Linear's default, as the reference; 'flax'

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.schedule = 'linear'
  c.diffusion.beta_start = 0.0001
  c.diffusion.beta_end = 0.02
  c.diffusion.num_train_timesteps = 1000
  c.diffusion.prediction_type = 'epsilon'

  c.loss = ml_collections.ConfigDict()
  c.loss.w_rec = 0.95
  c.loss.w_ind = 0.05
  c.loss.group_weights = ()              # per-group weights on each sample's MSE, e.g. (1.0, 4.0)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.schedule = 'cosine'            # constant | warmup | cosine
  c.optim.warmup_steps = 50
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.weight_decay = 1e-2
  c.optim.eps = 1e-8
  c.optim.clip = 'norm'                  # reference (value, per micro-step) | value | norm | none
  c.optim.clip_value = 1.0
  c.optim.grad_accum = 1

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 600
  c.train.batch_size = 64                # global, across all devices and hosts
  c.train.seed = 0
  c.train.ema_decay = 0.999
  c.train.log_every = 25
  c.train.checkpoint_every = 300
  c.train.keep_checkpoints = 3
  c.train.sample_every = 300
  c.train.num_sample_images = 64
  c.train.distributed = False            # call jax.distributed.initialize()
  c.train.skip_nonfinite = False         # skip (and count) NaN/Inf steps instead of stopping
  c.train.init_from = ''                 # a trained workdir: a new run starts from its UNet
  c.train.trainable = 'all'              # 'indicator': only the indicator is updated

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = 'ddim'
  c.sample.steps = 50
  c.sample.eta = 0.0
  return c
