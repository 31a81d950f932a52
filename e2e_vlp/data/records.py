"""Bad-input accounting and repair for the dataset builders.

Real datasets contain a few broken records (truncated JPEGs, CMYK images, boxes that
leave the image, blank captions). The builders repair what can be repaired, skip the
rest, and count every case in a `SkipCounter`, so that one bad file never stops a
multi-hour build and the summary tells the user what was dropped.
"""

import collections
import io
import math
import os
from typing import Sequence

from absl import logging
from PIL import Image

# Kinds that were repaired (the record was kept); every other kind dropped something.
REPAIRED = ('converted_image', 'clipped_box')

_JPEG_QUALITY = 95


class AllRecordsSkippedError(ValueError):
  """Every record of a split was skipped: the build would produce an empty split."""


class SkipCounter:
  """Counts repaired and skipped records of one split, by kind."""

  def __init__(self, name: str):
    self.name = name
    self._counts: collections.Counter[str] = collections.Counter()

  def count(self, kind: str, n: int = 1) -> None:
    if n:
      self._counts[kind] += n

  def __getitem__(self, kind: str) -> int:
    return self._counts[kind]

  @property
  def counts(self) -> dict[str, int]:
    return dict(self._counts)

  def summary(self) -> str:
    if not self._counts:
      return f'{self.name}: no bad input'
    parts = [
        f'{kind}={n} ({"repaired" if kind in REPAIRED else "dropped"})'
        for kind, n in sorted(self._counts.items())
    ]
    return f'{self.name}: ' + ', '.join(parts)

  def finish(self, num_examples: int) -> None:
    """Logs the summary; raises if the split is empty although it had records."""
    logging.info('%s; %d examples written.', self.summary(), num_examples)
    if num_examples == 0:
      raise AllRecordsSkippedError(
          f'Every record of {self.name} was skipped ({self.summary()}). Check that the '
          'manual_dir holds the images and annotation files in the published layout.')


def load_rgb_jpeg(path: str | os.PathLike, counter: SkipCounter) -> tuple[bytes, int, int] | None:
  """Reads an image file as RGB JPEG bytes.

  RGB JPEGs pass through byte for byte; grayscale, CMYK, palette or PNG images are
  converted to RGB and re-encoded ('converted_image'). Missing and undecodable files
  (truncated, corrupt) return None ('missing_image', 'corrupt_image').

  Returns:
    (jpeg_bytes, width, height) or None.
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    counter.count('missing_image')
    return None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # a full decode: truncated files fail here, not at training time
      width, height = image.size
      if image.format == 'JPEG' and image.mode == 'RGB':
        return data, width, height
      counter.count('converted_image')
      out = io.BytesIO()
      image.convert('RGB').save(out, format='JPEG', quality=_JPEG_QUALITY)
      return out.getvalue(), width, height
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
    counter.count('corrupt_image')
    return None


def xywh_to_bbox(box: Sequence[float], width: int, height: int,
                 counter: SkipCounter) -> list[float] | None:
  """COCO/VG `[x, y, w, h]` in pixels -> TFDS `[ymin, xmin, ymax, xmax]` in [0, 1].

  Boxes that leave the image are clipped to it ('clipped_box'); boxes with no area
  after clipping, negative sizes or non-finite values are dropped ('zero_area_box',
  'invalid_box').
  """
  if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
    counter.count('invalid_box')
    return None
  x, y, w, h = (float(v) for v in box)
  if w < 0 or h < 0:
    counter.count('invalid_box')
    return None
  x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
  x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
  if x1 <= x0 or y1 <= y0:
    counter.count('zero_area_box')
    return None
  if (x0, y0, x1, y1) != (x, y, x + w, y + h):
    counter.count('clipped_box')
  return [y0 / height, x0 / width, y1 / height, x1 / width]


def clean_caption(text: object, counter: SkipCounter) -> str | None:
  """Strips a caption; empty, blank or non-string captions are dropped ('empty_caption')."""
  if not isinstance(text, str) or not text.strip():
    counter.count('empty_caption')
    return None
  return ' '.join(text.split())
