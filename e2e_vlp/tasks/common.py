"""What the fine-tuning tasks share: data resolution, eval passes over the mesh, gathering.

Evaluation feeds each host's eval rows as one global batch (split over the data axes, as
training does), runs a jitted function and gathers its outputs to every host
(`process_allgather`), so the official metrics see the whole split in a fixed order. The
pipeline pads the last batch; its `valid` rows say which outputs are real.
"""

import functools
import json
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from e2e_vlp.data import prepare
from e2e_vlp.eval import coco_detection
from e2e_vlp.train import mesh as mesh_lib

Arrays = dict[str, np.ndarray]


def resolve_data(config: ml_collections.ConfigDict) -> prepare.DataSource:
  """The task's dataset (the embedded one is made on first use) and a checked tokenizer."""
  data = prepare.resolve(config)
  if data.tokenizer.vocab_size > config.model.vocab_size:
    raise ValueError(
        f'The tokenizer has {data.tokenizer.vocab_size} tokens but config.model.vocab_size='
        f'{config.model.vocab_size}; raise config.model.vocab_size.')
  return data


def _freeze(x: Any) -> Any:
  return tuple(_freeze(e) for e in x) if isinstance(x, (list, tuple)) else x


def jit_eval(fn: Callable[..., Any]) -> Callable[..., Any]:
  """`jax.jit(fn)` that also recompiles when the flax logical axis rules change.

  The rules are read while tracing (sharding hints inside the model), which `jax.jit`'s
  cache does not see; build the function once per task so that every evaluation reuses
  its compilation.
  """
  jitted = jax.jit(lambda *args, rules: fn(*args), static_argnames='rules')
  return lambda *args: jitted(*args, rules=_freeze(nn.get_logical_axis_rules()))


def gather(tree: Any) -> Any:
  """Host numpy copies: global jax.Arrays whole, host-local arrays concatenated over hosts."""
  return multihost_utils.process_allgather(tree, tiled=True)


def global_input(array: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """A global array split over the data axes from a value every host holds in full."""
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, mesh_lib.batch_sharding(mesh, array.ndim),
                                      lambda index: array[index])


def eval_batch_size(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
  size = int(config.eval.batch_size)
  mesh_lib.check_batch_size(size, mesh, 'config.eval.batch_size')
  return size


def run_eval(fn: Callable[[Any, dict[str, jax.Array]], Mapping[str, jax.Array]], variables: Any,
             batches: Iterable[dict[str, np.ndarray]], *, inputs: Sequence[str],
             keep: Sequence[str] = (), mesh: jax.sharding.Mesh, rules: Any,
             num_batches: int = 0) -> Arrays:
  """Runs `fn(variables, global batch of `inputs`)` over eval batches.

  Args:
    fn: jitted; its outputs have the batch as their leading axis.
    variables: the model variables.
    batches: host-local eval batches (with `valid`).
    inputs: keys fed to `fn` as global arrays.
    keep: keys returned as they are (ids, or host copies of inputs), gathered over hosts.
    mesh, rules: the loop's mesh and logical axis rules.
    num_batches: stop after this many batches; 0 = the whole split.

  Returns:
    fn's outputs and the `keep` columns over the valid rows of every host, in global order.
  """
  parts: list[Arrays] = []
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for index, local in enumerate(batches):
      if num_batches and index >= num_batches:
        break
      outputs = dict(fn(variables, mesh_lib.global_batch({k: local[k] for k in inputs}, mesh)))
      rows = gather({k: local[k] for k in tuple(keep) + ('valid',)})
      outputs = gather(outputs)
      valid = rows.pop('valid').astype(bool)
      if set(outputs) & set(rows):
        raise ValueError(f'fn outputs {sorted(set(outputs) & set(rows))} clash with `keep`.')
      parts.append({k: np.asarray(v)[valid] for k, v in {**outputs, **rows}.items()})
  if not parts:
    raise ValueError('The eval split gave no batch; check config.data.eval_split.')
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def results_path(workdir: str, name: str, split: str, step: int) -> str:
  return os.path.join(workdir, f'{name}_{split}_step{step}.json')


def write_json(obj: Any, path: str) -> None:
  """Writes JSON from process 0 only, atomically (a reader never sees half a file)."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f)
  os.replace(tmp, path)


def _detect(model: nn.Module, variables: Any, batch: dict[str, jax.Array]
            ) -> dict[str, jax.Array]:
  out = model.apply(variables, batch['image'], batch['image_mask'], method='detect')
  return {'class_logits': out['det_class_logits'][-1], 'pred_boxes': out['det_boxes'][-1]}


def detection_eval(model: nn.Module, variables: Any, batches: Iterable[dict[str, np.ndarray]],
                   *, class_names: Sequence[str], mesh: jax.sharding.Mesh, rules: Any,
                   results_file: str, category_ids: Sequence[int] | None = None,
                   num_batches: int = 0) -> dict[str, float]:
  """COCO box AP of the detection decoder, and its predictions as a COCO results JSON.

  Boxes are written in the pixels of the stored image (`original_size`), the frame of the
  official annotations, and scored against the ground truth of the same batches.

  Args:
    model: an E2EVLP; variables: its variables.
    batches: eval batches with image, image_mask, boxes, labels, box_mask, image_id,
      original_size, valid (`finetune_pipelines.make_detection_iterator`).
    class_names: names of the class indices.
    results_file: where the results records go (process 0 writes).
    category_ids: the dataset's category id of each class index; the index when None.
    num_batches: stop after this many batches; 0 = the whole split.

  Returns:
    detection_ap, detection_ap50, detection_ap75 (fractions in [0, 1]).
  """
  det = run_eval(jit_eval(functools.partial(_detect, model)), variables, batches,
                 inputs=('image', 'image_mask'),
                 keep=('original_size', 'boxes', 'labels', 'box_mask', 'image_id'), mesh=mesh,
                 rules=rules, num_batches=num_batches)
  image_ids = [int(i) for i in det['image_id']]
  results = coco_detection.detection_results(det['class_logits'], det['pred_boxes'],
                                             det['original_size'], image_ids, category_ids)
  write_json(results, results_file)
  coco_gt = coco_detection.coco_ground_truth(
      image_ids, det['original_size'], det['boxes'], det['labels'], det['box_mask'],
      category_ids=category_ids, category_names=list(class_names) or None)
  scores = coco_detection.evaluate_detections(coco_gt, results)
  return {'detection_ap': scores['AP'], 'detection_ap50': scores['AP50'],
          'detection_ap75': scores['AP75']}
