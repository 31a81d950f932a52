"""A PNG of predictions: boxes with class names and a caption under each image."""

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
            (145, 30, 180), (70, 240, 240), (240, 50, 230))


def real_sizes(image_mask: np.ndarray) -> np.ndarray:
  """[B, H, W] bool -> [B, 2] (height, width) of the real (top-left aligned) image."""
  mask = np.asarray(image_mask, bool)
  return np.stack([mask.any(axis=2).sum(axis=1), mask.any(axis=1).sum(axis=1)], axis=-1)


def _softmax(x: np.ndarray) -> np.ndarray:
  x = np.exp(x - x.max(axis=-1, keepdims=True))
  return x / x.sum(axis=-1, keepdims=True)


def draw_predictions(path: str, images: np.ndarray, image_mask: np.ndarray,
                     class_logits: np.ndarray, boxes: np.ndarray, captions: Sequence[str],
                     class_names: Sequence[str], *, threshold: float = 0.5,
                     scale: int = 3):
  """Writes one row of panels: each image (unpadded, enlarged) with its detections.

  images [N, H, W, 3] normalised; class_logits [N, Q, C+1]; boxes [N, Q, 4] cxcywh relative
  to the real image.
  """
  sizes = real_sizes(image_mask)
  probs = _softmax(np.asarray(class_logits, np.float64))[..., :-1]
  panels = []
  caption_height = 28
  for i, (h, w) in enumerate(sizes):
    pixels = np.asarray(images[i][:h, :w]) * IMAGENET_STD + IMAGENET_MEAN
    pixels = (np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    panel = Image.fromarray(pixels).resize((w * scale, h * scale), Image.NEAREST)
    canvas = Image.new('RGB', (panel.width, panel.height + caption_height), 'white')
    canvas.paste(panel, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for q in np.nonzero(probs[i].max(-1) > threshold)[0]:
      label = int(probs[i, q].argmax())
      cx, cy, bw, bh = boxes[i, q] * np.array([w, h, w, h]) * scale
      colour = _COLOURS[label % len(_COLOURS)]
      draw.rectangle([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], outline=colour,
                     width=2)
      name = class_names[label] if label < len(class_names) else str(label)
      draw.text((cx - bw / 2 + 2, cy - bh / 2 + 1), f'{name} {probs[i, q].max():.2f}',
                fill=colour)
    words, lines = captions[i].split(), ['']
    for word in words:  # wrap to the panel width (about 6 px per character)
      if len(lines[-1]) + len(word) + 1 > panel.width // 6:
        lines.append('')
      lines[-1] = (lines[-1] + ' ' + word).strip()
    draw.text((2, panel.height + 2), '\n'.join(lines[:2]), fill='black')
    panels.append(canvas)
  width = sum(p.width for p in panels) + 4 * (len(panels) + 1)
  height = max(p.height for p in panels) + 8
  sheet = Image.new('RGB', (width, height), (200, 200, 200))
  x = 4
  for panel in panels:
    sheet.paste(panel, (x, 4))
    x += panel.width + 4
  sheet.save(path)
