"""Training metrics: TensorBoard (clu), `metrics.jsonl` and a progress line, process 0 only."""

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import logging
from clu import metric_writers


def to_python(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class MetricsLogger:
  """Writes each logged step once to TensorBoard and `metrics.jsonl`; prints progress."""

  def __init__(self, workdir: str, total_steps: int):
    self.active = jax.process_index() == 0
    self.total_steps = total_steps
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._writer = metric_writers.create_default_writer(
        workdir, just_logging=not self.active, asynchronous=False)
    self._start = None
    self._start_step = 0

  def start(self, step: int):
    self._start, self._start_step = time.time(), step

  def write(self, step: int, metrics: Mapping[str, Any], *, prefix: str = '') -> dict:
    values = {prefix + k: to_python(v) for k, v in metrics.items()}
    scalars = {k: v for k, v in values.items() if isinstance(v, (int, float))}
    self._writer.write_scalars(step, scalars)
    if self.active:
      with open(self.path, 'a') as f:
        f.write(json.dumps({'step': step, **values}, allow_nan=True) + '\n')
    return values

  def write_image(self, step: int, name: str, image: np.ndarray):
    self._writer.write_images(step, {name: image[None]})

  def progress(self, step: int, values: Mapping[str, Any]) -> str:
    """One line: step, ETA and the main losses."""
    elapsed = time.time() - (self._start or time.time())
    done = step - self._start_step
    eta = elapsed / done * (self.total_steps - step) if done > 0 else float('nan')
    shown = ' '.join(f'{k}={v:.4g}' for k, v in values.items()
                     if isinstance(v, float) and (k.endswith('loss') or k.endswith('accuracy')))
    line = (f'step {step}/{self.total_steps} ({100 * step / self.total_steps:.0f}%) '
            f'eta {_duration(eta)} | {shown}')
    if self.active:
      logging.info('%s', line)
    return line

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


def _duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return '?'
  minutes, seconds = divmod(int(seconds), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


def nonfinite_terms(values: Mapping[str, Any]) -> list[str]:
  return sorted(k for k, v in values.items()
                if isinstance(v, float) and not math.isfinite(v))
