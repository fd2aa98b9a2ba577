"""Every field of an E4T domain-pretraining run, with the paper's / reference's defaults.

Other configs start from this one and change a few fields. Any field can be overridden on the
command line:
  e4t pretrain --config configs/faces.py --workdir /tmp/run --config.optimizer.learning_rate=1e-5
"""
import ml_collections

from e4t_jax.parallel.mesh import DEFAULT_LOGICAL_AXIS_RULES

# The reference implementation's prompt templates ('{}' is replaced by the placeholder token).
COMMON_TEMPLATES = (
    'a photo of {}',
    'a rendering of {}',
    'a cropped photo of {}',
    'the photo of {}',
    'a photo of a clean {}',
    'a photo of a dirty {}',
    'a dark photo of {}',
    'a photo of my {}',
    'a photo of the cool {}',
    'a close-up photo of {}',
    'a bright photo of {}',
    'a cropped photo of the {}',
    'a photo of the {}',
    'a good photo of {}',
    'a photo of one {}',
    'a close-up photo of the {}',
    'a rendition of {}',
    'a photo of the clean {}',
    'a rendition of the {}',
    'a photo of a nice {}',
    'a good photo of the {}',
    'a photo of the nice {}',
    'a photo of the small {}',
    'a photo of the weird {}',
    'a photo of the large {}',
    'a photo of a cool {}',
    'a photo of a small {}',
)


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.model = ml_collections.ConfigDict()
  config.model.base = 'tiny'           # a diffusers Stable Diffusion folder, or 'tiny' (random, CPU)
  config.model.image_encoder = ''      # a transformers CLIP vision folder (unused for 'tiny')
  config.model.dtype = 'float32'       # compute dtype: 'float32' | 'bfloat16' (params stay float32)
  # nn.remat per U-Net block: '' (off) | 'nothing_saveable' | 'dots_saveable' | 'everything_saveable'
  config.model.remat_policy = ''

  config.e4t = ml_collections.ConfigDict()
  config.e4t.coarse_word = 'face'      # a single CLIP token naming the domain
  config.e4t.placeholder = '*'
  config.e4t.embedding_scale = 0.1     # s in w* = w_coarse + s * f
  config.e4t.lambda_embedding = 0.01   # on ||f||^2
  config.e4t.lambda_offsets = 1e-4     # on sum ||dW||^2
  config.e4t.coarse_prompt = 'a photo of a {coarse}'
  config.e4t.templates = COMMON_TEMPLATES
  config.e4t.use_loss_mask = False     # weight the diffusion loss by the data's masks
  config.e4t.min_snr_gamma = 0.0       # min-SNR-γ loss weighting (0: the paper's plain MSE)
  config.e4t.trainable_patterns = ()   # regexes over 'image_encoder/...' paths that train too

  config.encoder = ml_collections.ConfigDict()
  config.encoder.hidden_dim = 1024
  config.encoder.clip_layers = (-1,)
  config.encoder.unet_features = 'down+mid'
  config.encoder.mlp_depth = 2
  config.encoder.leaky_relu_slope = 0.01

  config.offsets = ml_collections.ConfigDict()
  config.offsets.rank = 4
  config.offsets.mode = 'additive'
  config.offsets.targets = (r'attn[12]/to_[qkv]$',)
  config.offsets.init_scale = 1.0

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.learning_rate = 1.6e-5
  config.optimizer.global_batch_size = 16   # across all processes and devices
  config.optimizer.warmup_steps = 0
  config.optimizer.decay = 'constant'       # 'constant' | 'cosine'
  config.optimizer.total_steps = 0          # cosine: 0 means train.num_steps
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.eps = 1e-8
  config.optimizer.weight_decay = 1e-2
  config.optimizer.max_grad_norm = 1.0
  config.optimizer.grad_accumulation = 1

  config.data = ml_collections.ConfigDict()
  config.data.source = 'synthetic'     # 'synthetic' | 'synthetic_faces' (captioned) | 'folder' | 'array_record' | 'tfds'
  config.data.path = ''                # image folder, shard glob, or TFDS name
  config.data.mask_path = ''           # folder source: one mask per image
  config.data.tfds_split = 'train'
  config.data.tfds_data_dir = ''
  config.data.tfds_mask_key = ''
  config.data.synthetic_records = 256
  config.data.resolution = 0           # 0: the model's native image size
  config.data.shuffle_seed = 0
  config.data.random_flip = True
  config.data.workers = 0              # grain worker processes (0: decode in this process)

  config.train = ml_collections.ConfigDict()
  config.train.num_steps = 30_000
  config.train.log_every = 50
  config.train.checkpoint_every = 1_000
  config.train.keep_checkpoints = 3
  config.train.async_checkpoints = True
  config.train.seed = 0
  config.train.peak_tflops_per_device = 0.0  # for MFU; 0: look the device kind up (unknown: no MFU)
  config.train.progress_bar = True
  config.train.save_model = True       # write workdir/model/ at the end

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1                # -1: every device not used by the other axes
  config.mesh.fsdp = 1
  config.mesh.tensor = 1
  config.mesh.num_devices = 0          # use the first N devices of every process (0: all)
  config.mesh.logical_axis_rules = tuple(
      (name, tuple(axis) if isinstance(axis, (list, tuple)) else axis) for name, axis in DEFAULT_LOGICAL_AXIS_RULES)
  config.mesh.frozen_sharding = 'replicated'  # 'replicated' | 'fsdp' (frozen weights follow the rules)

  return config
