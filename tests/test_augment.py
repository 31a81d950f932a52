"""Augmentation: boxes follow the pixels through flip, resize and crop (hand-computed)."""

import numpy as np
import pytest
import tensorflow as tf
import torch

from e2e_vlp.data import augment

MEAN = np.array(augment.IMAGENET_MEAN, np.float32)
STD = np.array(augment.IMAGENET_STD, np.float32)


def _options(**kw):
  base = dict(image_size=128, resize_sizes=(50,), max_size=1000, hflip_prob=0.0, crop_prob=0.0)
  base.update(kw)
  return augment.AugmentOptions(**base)


def _smooth_image(h, w):
  """A smooth uint8 image, distinct per channel."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float32)
  return np.stack([255 * y / h, 255 * x / w, 128 + 100 * np.sin(x / 9 + y / 13)],
                  -1).round().astype(np.uint8)


def _torch_resize(image, h, w, *, antialias):
  pixels = torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
  out = torch.nn.functional.interpolate(pixels, size=(h, w), mode='bilinear',
                                        align_corners=False, antialias=antialias)
  return out[0].permute(1, 2, 0).numpy()


def _detr_get_size(h, w, size, max_size):
  """DETR's get_size_with_aspect_ratio, transcribed from the paper's code as a reference."""
  lo, hi = float(min(w, h)), float(max(w, h))
  if hi / lo * size > max_size:
    size = int(round(max_size * lo / hi))
  if w < h:
    return int(size * h / w), size
  return size, int(size * w / h)


@pytest.mark.parametrize('h,w,size,max_size', [(100, 200, 50, 1000), (480, 640, 800, 1333),
                                               (640, 427, 800, 1333), (300, 900, 96, 96),
                                               (77, 77, 60, 100)])
def test_resized_shape_matches_detr(h, w, size, max_size):
  oh, ow = augment.resized_shape(h, w, size, max_size)
  assert (int(oh), int(ow)) == _detr_get_size(h, w, size, max_size)


def test_resized_shape_fits_canvas():
  # 600 x 1000 at shorter side 800 -> 800 x 1333; the 800 canvas then scales it to 480 x 800.
  oh, ow = augment.resized_shape(600, 1000, 800, 1333, canvas=800)
  assert (int(oh), int(ow)) == (480, 800)


def test_flip_and_resize_boxes_pixels_and_mask():
  image = _smooth_image(100, 200)
  # Box in pixels: rows 10..50, cols 20..80 of the 100 x 200 image.
  boxes = np.array([[0.1, 0.1, 0.5, 0.4]], np.float32)
  out = augment.augment(image, boxes, tf.constant(['a dog on the left']), tf.constant([1, 2]),
                        _options(hflip_prob=1.0), train=True)
  # Flipped: cols 200-80..200-20 = 120..180 -> x 0.6..0.9; resize keeps normalised boxes.
  np.testing.assert_allclose(out['boxes'].numpy(), [[0.75, 0.3, 0.3, 0.4]], atol=1e-6)
  assert out['box_keep'].numpy().tolist() == [True]
  assert out['captions'].numpy().tolist() == [b'a dog on the right']
  # Shorter side 100 -> 50: the real image is 50 x 100, top-left, the rest padded with zeros.
  mask = out['image_mask'].numpy()
  assert mask.shape == (128, 128) and mask[:50, :100].all() and mask.sum() == 50 * 100
  pixels = out['image'].numpy()
  assert np.all(pixels[50:] == 0) and np.all(pixels[:, 100:] == 0)
  reference = _torch_resize(image[:, ::-1], 50, 100, antialias=False)
  np.testing.assert_allclose((pixels[:50, :100] * STD + MEAN) * 255, reference, atol=2e-3)


@pytest.mark.parametrize('h,w', [(40, 50), (60, 80), (90, 120), (200, 260)])
def test_resize_matches_torch(h, w):
  # Antialiased (PIL-like, as DETR) only when shrinking by more than 2x: 120x160 -> 40x50.
  image = np.random.default_rng(0).integers(0, 255, (120, 160, 3)).astype(np.uint8)
  antialias = 2 * h < 120 or 2 * w < 160
  np.testing.assert_allclose(augment.resize(image, (h, w)).numpy(),
                             _torch_resize(image, h, w, antialias=antialias), atol=1e-3)


def test_crop_clips_and_drops_boxes():
  image = np.zeros((100, 200, 3), np.uint8)
  # Pixels (y0, x0, y1, x1): inside, straddling the window's corner, outside, touching an edge.
  pixel_boxes = np.array([[30, 60, 40, 80], [10, 40, 50, 100], [0, 0, 20, 30],
                          [20, 50, 60, 50]], np.float32)
  boxes = pixel_boxes / [100, 200, 100, 200]
  out_image, out_boxes, keep = augment.crop(image, boxes, 20, 50, 60, 100)  # rows 20..80
  assert out_image.shape == (60, 100, 3)
  expected = np.array([[10, 10, 20, 30], [0, 0, 30, 50], [0, 0, 0, 0], [0, 0, 40, 0]],
                      np.float32) / [60, 100, 60, 100]
  np.testing.assert_allclose(out_boxes.numpy(), expected, atol=1e-6)
  assert keep.numpy().tolist() == [True, True, False, False]


def test_random_size_crop_window_matches_pixels():
  # Pixel values encode their coordinates, so the crop window can be read back from the image.
  h, w = 60, 90
  y, x = np.mgrid[0:h, 0:w]
  image = np.stack([y, x, np.zeros_like(y)], -1).astype(np.uint8)
  pixel_box = np.array([10, 20, 40, 70], np.float32)
  for s in range(5):
    out, box, keep = augment.random_size_crop(image, pixel_box[None] / [h, w, h, w],
                                              tf.constant([s, 7]), 20, 50)
    out = out.numpy()
    top, left = int(out[0, 0, 0]), int(out[0, 0, 1])
    ch, cw = out.shape[:2]
    assert 20 <= ch <= 50 and 20 <= cw <= 50
    np.testing.assert_array_equal(out, image[top:top + ch, left:left + cw])
    clipped = np.clip(pixel_box - [top, left, top, left], 0, [ch, cw, ch, cw])
    np.testing.assert_allclose(box.numpy()[0], clipped / [ch, cw, ch, cw], atol=1e-6)
    assert keep.numpy()[0] == (clipped[2] > clipped[0] and clipped[3] > clipped[1])


def test_crop_branch_keeps_boxes_consistent():
  options = _options(image_size=64, resize_sizes=(48,), max_size=64, crop_prob=1.0,
                     crop_resize_sizes=(60,), crop_min_size=20, crop_max_size=40)
  image = _smooth_image(60, 80)
  boxes = np.array([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.01, 0.01]], np.float32)
  out = augment.augment(image, boxes, tf.constant(['x']), tf.constant([3, 4]), options,
                        train=True)
  # A crop of 20..40 px sides resized to shorter side 48 (longer side capped at 64).
  mask = out['image_mask'].numpy()
  rows, cols = mask.any(1).sum(), mask.any(0).sum()
  assert min(rows, cols) == 48 or max(rows, cols) == 64
  # The whole-image box covers every crop entirely.
  np.testing.assert_allclose(out['boxes'].numpy()[0], [0.5, 0.5, 1.0, 1.0], atol=1e-6)


def test_swap_left_right_whole_words_both_ways():
  captions = tf.constant(['Left of the right tree, leftover LEFT. Right-hand', 'bright light',
                          'lEfT'])
  out = augment.swap_left_right(captions).numpy().tolist()
  assert out == [b'Right of the left tree, leftover RIGHT. Left-hand', b'bright light', b'right']


def test_eval_is_deterministic_largest_size():
  options = _options(resize_sizes=(40, 50, 60), hflip_prob=1.0, crop_prob=1.0,
                     crop_resize_sizes=(60,), crop_min_size=20, crop_max_size=40)
  image = _smooth_image(100, 120)
  boxes = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)
  outs = [augment.augment(image, boxes, tf.constant(['left']), tf.constant([s, 0]), options,
                          train=False) for s in (0, 1)]
  for out in outs:
    assert int(out['image_mask'].numpy().sum()) == 60 * 72  # shorter side 60, no flip or crop
    assert out['captions'].numpy().tolist() == [b'left']
    np.testing.assert_allclose(out['boxes'].numpy(), [[0.3, 0.2, 0.2, 0.2]], atol=1e-6)
  np.testing.assert_array_equal(outs[0]['image'].numpy(), outs[1]['image'].numpy())


def test_train_randomness_is_seeded():
  options = _options(resize_sizes=(40, 50, 60), hflip_prob=0.5)
  image = _smooth_image(50, 60)
  boxes = np.array([[0.1, 0.2, 0.3, 0.4]], np.float32)

  @tf.function
  def run(seed):
    out = augment.augment(image, boxes, tf.constant(['left']), seed, options, train=True)
    return out['boxes'][0, 0], tf.reduce_sum(tf.cast(out['image_mask'], tf.int32))

  results = [tuple(np.asarray(v).item() for v in run(tf.constant([s, 9]))) for s in range(64)]
  assert results == [tuple(np.asarray(v).item() for v in run(tf.constant([s, 9])))
                     for s in range(64)]
  flipped = np.mean([np.isclose(cx, 1 - 0.3) for cx, _ in results])
  assert 0.3 < flipped < 0.7
  assert len({area for _, area in results}) == 3  # all three shorter sides drawn
