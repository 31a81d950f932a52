"""DETR-style image augmentation in pure TensorFlow, with boxes and captions following pixels.

Train: horizontal flip (boxes mirrored, "left"/"right" swapped in the captions), then either a
random shorter-side resize or, with `crop_prob`, resize -> random-size crop -> resize (DETR's
`RandomSelect`), a fit into the static canvas, ImageNet normalisation and zero padding.
Eval: one deterministic resize. Every random draw is a stateless op keyed by an explicit
per-example seed, so a pipeline is reproducible and resumable from its position alone.

Boxes travel as TFDS-normalised `[ymin, xmin, ymax, xmax]` relative to the current image, so
a resize leaves them unchanged; only flips and crops move them. They leave as normalised
`[cx, cy, w, h]` relative to the real (unpadded, augmented) image.
"""

import dataclasses
from typing import Any, Sequence

import tensorflow as tf

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# DETR's crop branch at its 800-pixel scale: resize to 400/500/600, crop sides in [384, 600].
# Stored relative to the canvas so that the same recipe works at any resolution.
_CROP_RESIZE_FRACS = (0.5, 0.625, 0.75)
_CROP_SIZE_FRACS = (0.48, 0.75)
_PLACEHOLDERS = ('\ue000', '\ue001', '\ue002', '\ue003')


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
  """Augmentation knobs; `from_config` reads them from `config.data`."""
  image_size: int  # static square canvas side S
  resize_sizes: tuple[int, ...]  # shorter-side choices (train); eval uses the largest
  max_size: int  # longer-side cap before the canvas fit
  hflip_prob: float = 0.5
  crop_prob: float = 0.0
  crop_resize_sizes: tuple[int, ...] = ()  # shorter side before cropping
  crop_min_size: int = 1  # crop side range, in pixels of the resized image
  crop_max_size: int = 1

  @classmethod
  def from_config(cls, data_config: Any) -> 'AugmentOptions':
    """Reads `config.data`; crop sizes default to DETR's, scaled to the canvas."""
    size = int(data_config.image_size)
    get = data_config.get
    crop_resize = get('crop_resize_sizes', None) or tuple(
        int(round(f * size)) for f in _CROP_RESIZE_FRACS)
    return cls(
        image_size=size,
        resize_sizes=tuple(int(s) for s in data_config.resize_sizes),
        max_size=int(data_config.max_size),
        hflip_prob=float(data_config.hflip_prob),
        crop_prob=float(data_config.crop_prob),
        crop_resize_sizes=tuple(int(s) for s in crop_resize),
        crop_min_size=int(get('crop_min_size', None) or round(_CROP_SIZE_FRACS[0] * size)),
        crop_max_size=int(get('crop_max_size', None) or round(_CROP_SIZE_FRACS[1] * size)),
    )

  def __post_init__(self):
    if not self.resize_sizes:
      raise ValueError('config.data.resize_sizes is empty; give at least one shorter side.')
    if self.crop_prob > 0 and not (0 < self.crop_min_size <= self.crop_max_size):
      raise ValueError(
          f'Need 0 < crop_min_size <= crop_max_size, got {self.crop_min_size} and '
          f'{self.crop_max_size}; fix config.data.crop_min_size / crop_max_size.')


def _randint(seed: tf.Tensor, low, high) -> tf.Tensor:
  """A uniform int32 in [low, high] (both inclusive)."""
  return tf.random.stateless_uniform(
      [], seed, minval=tf.cast(low, tf.int32), maxval=tf.cast(high, tf.int32) + 1,
      dtype=tf.int32)


def _choice(seed: tf.Tensor, values: Sequence[int]) -> tf.Tensor:
  """One of `values`, uniformly."""
  return tf.gather(tf.constant(values, tf.int32), _randint(seed, 0, len(values) - 1))


def _bernoulli(seed: tf.Tensor, prob: float) -> tf.Tensor:
  return tf.random.stateless_uniform([], seed) < prob


def resized_shape(height: tf.Tensor, width: tf.Tensor, size: tf.Tensor, max_size: int,
                  canvas: int | None = None) -> tuple[tf.Tensor, tf.Tensor]:
  """DETR's `get_size`: shorter side to `size`, longer side capped at `max_size`.

  With `canvas`, the result is then scaled down (if needed) so that both sides fit in it.
  Returns int32 scalars (out_height, out_width).
  """
  h = tf.cast(height, tf.float64)
  w = tf.cast(width, tf.float64)
  size = tf.cast(size, tf.float64)
  short, long = tf.minimum(h, w), tf.maximum(h, w)
  size = tf.where(long / short * size > max_size, tf.round(max_size * short / long), size)
  oh = tf.where(w < h, tf.floor(size * h / w), size)
  ow = tf.where(w < h, size, tf.floor(size * w / h))
  if canvas is not None:
    canvas = tf.constant(canvas, tf.float64)
    scale = tf.minimum(tf.constant(1.0, tf.float64), canvas / tf.maximum(oh, ow))
    oh = tf.minimum(canvas, tf.round(oh * scale))
    ow = tf.minimum(canvas, tf.round(ow * scale))
  one = tf.constant(1.0, tf.float64)
  oh = tf.maximum(oh, one)
  ow = tf.maximum(ow, one)
  return tf.cast(oh, tf.int32), tf.cast(ow, tf.int32)


def resize(image: tf.Tensor, shape: tuple[tf.Tensor, tf.Tensor]) -> tf.Tensor:
  """[H, W, 3] -> [h, w, 3] float32 in [0, 255], bilinear.

  Antialiased (like PIL's resize in DETR) only when shrinking by more than 2x: plain bilinear
  already averages the input pixels at milder scales, and the antialiased kernel costs about
  7x more (7 vs 1 ms for 640x480 -> 512x384 here).
  """
  image = tf.cast(image, tf.float32)
  size = tf.stack(shape)
  shrink = tf.reduce_any(2 * size < tf.shape(image)[:2])
  return tf.cond(
      shrink, lambda: tf.image.resize(image, size, method='bilinear', antialias=True),
      lambda: tf.image.resize(image, size, method='bilinear'))


def hflip_boxes(boxes: tf.Tensor) -> tf.Tensor:
  """Mirrors normalised [M, 4] yxyx boxes about the vertical centre line."""
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  return tf.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1)


def swap_left_right(captions: tf.Tensor) -> tf.Tensor:
  """Swaps the whole words "left" and "right" (any case; "leftover" untouched).

  Lower-case, Capitalised and UPPER-case spellings keep their case; other mixed cases come
  out lower-case. Goes through private-use placeholders so that the swap does not overwrite.
  """
  to_tmp = []
  for word, mark in (('left', _PLACEHOLDERS[0]), ('right', _PLACEHOLDERS[2])):
    to_tmp += [(word.upper(), mark + mark), (word.capitalize(), mark + _PLACEHOLDERS[1]),
               (f'(?i){word}', mark)]
  out = captions
  for pattern, mark in to_tmp:
    out = tf.strings.regex_replace(out, rf'\b{pattern}\b', mark)
  from_tmp = []
  for word, mark in (('right', _PLACEHOLDERS[0]), ('left', _PLACEHOLDERS[2])):
    from_tmp += [(mark + mark, word.upper()), (mark + _PLACEHOLDERS[1], word.capitalize()),
                 (mark, word)]
  for mark, word in from_tmp:
    out = tf.strings.regex_replace(out, mark, word)
  return out


def crop(image: tf.Tensor, boxes: tf.Tensor, top: tf.Tensor, left: tf.Tensor,
         height: tf.Tensor, width: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """Crops [H, W, C] to the window; clips [M, 4] normalised yxyx boxes into it.

  Returns (image [height, width, C], boxes [M, 4] normalised to the crop, keep [M] bool:
  false where a box has no area left).
  """
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  scale = tf.cast(tf.stack([shape[0], shape[1], shape[0], shape[1]]), tf.float32)
  window = tf.cast(tf.stack([height, width, height, width]), tf.float32)
  offset = tf.cast(tf.stack([top, left, top, left]), tf.float32)
  pixels = tf.clip_by_value(boxes * scale - offset, 0.0, window)
  keep = (pixels[:, 2] > pixels[:, 0]) & (pixels[:, 3] > pixels[:, 1])
  image = image[top:top + height, left:left + width]
  return image, pixels / window, keep


def random_size_crop(image: tf.Tensor, boxes: tf.Tensor, seed: tf.Tensor, min_size: int,
                     max_size: int) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """DETR's RandomSizeCrop: side lengths in [min_size, min(side, max_size)], random place."""
  seeds = tf.random.split(seed, 4)
  image = tf.convert_to_tensor(image)
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  ch = _randint(seeds[0], tf.minimum(min_size, h), tf.minimum(h, max_size))
  cw = _randint(seeds[1], tf.minimum(min_size, w), tf.minimum(w, max_size))
  top = _randint(seeds[2], 0, h - ch)
  left = _randint(seeds[3], 0, w - cw)
  return crop(image, boxes, top, left, ch, cw)


def normalize_and_pad(image: tf.Tensor, canvas: int) -> tuple[tf.Tensor, tf.Tensor]:
  """[h, w, 3] in [0, 255] -> ImageNet-normalised [S, S, 3] top-left aligned, mask [S, S]."""
  std = tf.constant(IMAGENET_STD)
  image = image * (1.0 / (255.0 * std)) - tf.constant(IMAGENET_MEAN) / std
  shape = tf.shape(image)
  image = tf.pad(image, [[0, canvas - shape[0]], [0, canvas - shape[1]], [0, 0]])
  mask = (tf.range(canvas)[:, None] < shape[0]) & (tf.range(canvas)[None, :] < shape[1])
  image.set_shape([canvas, canvas, 3])
  return image, mask


def yxyx_to_cxcywh(boxes: tf.Tensor) -> tf.Tensor:
  ymin, xmin, ymax, xmax = tf.unstack(boxes, axis=-1)
  return tf.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)


def augment(image: tf.Tensor, boxes: tf.Tensor, captions: tf.Tensor, seed: tf.Tensor,
            options: AugmentOptions, *, train: bool) -> dict[str, tf.Tensor]:
  """Augments one example.

  Args:
    image: [H, W, 3] uint8.
    boxes: [M, 4] float32 TFDS-normalised [ymin, xmin, ymax, xmax].
    captions: [C] string.
    seed: [2] integer stateless seed for this example (ignored when `train` is False).
    options: the knobs.
    train: random flip/resize/crop if True, else one deterministic resize.

  Returns:
    image [S, S, 3] float32 normalised, image_mask [S, S] bool, boxes [M, 4] normalised cxcywh
    relative to the real image, box_keep [M] bool (false for boxes with no area, e.g. cropped
    away), captions [C] (left/right swapped when flipped).
  """
  image = tf.convert_to_tensor(image)
  boxes = tf.reshape(tf.cast(boxes, tf.float32), [-1, 4])
  captions = tf.convert_to_tensor(captions, tf.string)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  size = options.image_size
  if train:
    seed_flip, seed_branch, seed_crop_size, seed_crop, seed_size = tf.unstack(
        tf.random.split(seed, 5))
    flip = _bernoulli(seed_flip, options.hflip_prob)
    image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
    boxes = tf.cond(flip, lambda: hflip_boxes(boxes), lambda: boxes)
    captions = tf.cond(flip, lambda: swap_left_right(captions), lambda: captions)
    if options.crop_prob > 0:
      def crop_branch():
        shape = tf.shape(image)
        pre = resized_shape(shape[0], shape[1], _choice(seed_crop_size,
                                                        options.crop_resize_sizes),
                            options.max_size)
        return random_size_crop(resize(image, pre), boxes, seed_crop, options.crop_min_size,
                                options.crop_max_size)

      image, boxes, cropped_keep = tf.cond(
          _bernoulli(seed_branch, options.crop_prob), crop_branch,
          lambda: (tf.cast(image, tf.float32), boxes, tf.ones_like(keep)))
      keep &= cropped_keep
    short = _choice(seed_size, options.resize_sizes)
  else:
    short = tf.constant(max(options.resize_sizes), tf.int32)
  shape = tf.shape(image)
  image = resize(image, resized_shape(shape[0], shape[1], short, options.max_size, size))
  image, mask = normalize_and_pad(image, size)
  return {'image': image, 'image_mask': mask, 'boxes': yxyx_to_cxcywh(boxes),
          'box_keep': keep, 'captions': captions}
