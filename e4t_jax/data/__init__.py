"""Input layer: robust image loading, random-access sources and the grain training loader."""
from e4t_jax.data.images import (  # noqa: F401
    DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, MIN_SIDE, center_crop_resize, decode_image_bytes, list_images,
    load_image, load_mask, to_rgb_uint8)
from e4t_jax.data.loader import (  # noqa: F401
    iterator_state_from_bytes, iterator_state_to_bytes, make_loader, per_process_batch_size)
from e4t_jax.data.sources import (  # noqa: F401
    ArrayRecordSource, ImageFolderSource, SyntheticSource, TFDSSource, write_array_record_shards)
