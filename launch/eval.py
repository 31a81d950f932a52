r"""Evaluates the newest checkpoint of a workdir without training.

  python launch/eval.py --config configs/vqa.py --workdir workdirs/vqa_tiny
  python launch/eval.py --config configs/caption.py --workdir workdirs/caption_tiny \
      --config.data.eval_split test --config.eval.beam_size 5
  python launch/eval.py --config configs/pretrain.py --workdir workdirs/pretrain_tiny

Runs the task's own `evaluate` (the one training calls) on a mesh built as training
builds it, so the numbers match those logged during training at the same step; the task
writes its result files (VQA submission, caption results) into the workdir. The
pre-training config also gets its detections written as a COCO results JSON in the stored
images' pixels (`detections_<split>_step<N>.json`; `category_id` is the class index) and
AP / AP50 / AP75 from them (over config.train.eval_batches batches, as its training-time
evaluation does). All metrics go to `<workdir>/eval_<split>_step<N>.json`.
"""

import _bootstrap  # pylint: disable=g-bad-import-order

import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging
from flax import traverse_util

from e2e_vlp import tasks
from e2e_vlp.data import finetune_pipelines
from e2e_vlp.tasks import common
from e2e_vlp.train import checkpoint as ckpt_lib
from e2e_vlp.train import compile_cache
from e2e_vlp.train import distributed
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import sharding
from e2e_vlp.train import state as state_lib

_bootstrap.define_config_flag(
    os.path.join(_bootstrap.ROOT, 'configs', 'pretrain.py'),
    'The config the workdir was trained with, optionally with an argument.')
flags.DEFINE_string('workdir', None, 'The training workdir (its checkpoints/ are read).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-process).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-process).')
flags.DEFINE_integer('process_id', None, 'This process (multi-process).')
flags.mark_flag_as_required('workdir')


def _place(tree: Any, shardings: Any, what: str) -> Any:
  """Host numpy leaves -> global arrays with the training shardings (identical on hosts)."""
  flat = traverse_util.flatten_dict(tree, sep='/')
  expected = traverse_util.flatten_dict(shardings, sep='/')
  if set(flat) != set(expected):
    missing, extra = sorted(set(expected) - set(flat)), sorted(set(flat) - set(expected))
    raise ValueError(f'The checkpoint {what} do not match config.task: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}. Pass the config the workdir was trained with.')
  placed = {k: jax.make_array_from_callback(np.shape(v), expected[k],
                                            lambda index, v=v: np.asarray(v)[index])
            for k, v in flat.items()}
  return traverse_util.unflatten_dict(placed, sep='/')


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """The task's evaluation of the newest readable checkpoint under `workdir`."""
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = sharding.logical_axis_rules(config.sharding)
  task = tasks.get_task(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, shardings = state_lib.state_shardings(task.init_variables, optax.identity(), mesh, rules)
  step, source = ckpt_lib.load_params(workdir)
  params = _place(source['params'], shardings.params, 'parameters')
  constants = _place(source['constants'], shardings.constants, 'constants')
  logging.info('Evaluating step %d of %s on %s.', step, workdir, config.data.eval_split)
  metrics = dict(task.evaluate(params, constants, step=step, workdir=workdir, mesh=mesh,
                               rules=rules))
  split = config.data.eval_split
  if config.task == 'pretrain':
    batches = finetune_pipelines.make_detection_iterator(
        config.data, task.tokenizer, split=split, global_batch_size=config.train.batch_size,
        seed=config.data.seed, dataset=task.data.dataset, data_dir=task.data.data_dir)
    metrics.update(common.detection_eval(
        task.model, {'params': params, **constants}, batches,
        class_names=task.data.class_names, mesh=mesh, rules=rules,
        results_file=common.results_path(workdir, 'detections', split, step),
        num_batches=config.train.eval_batches))
  metrics['step'] = step
  common.write_json(metrics, common.results_path(workdir, 'eval', split, step))
  return metrics


def main(argv):
  del argv
  f = flags.FLAGS
  distributed.initialize_from_environment(f.coordinator_address, f.num_processes, f.process_id)
  # The run's cache: the evaluation it compiled while training loads from there.
  with compile_cache.persistent(
      compile_cache.resolve(f.config.train.compilation_cache_dir, os.path.abspath(f.workdir))):
    metrics = evaluate_checkpoint(f.config, f.workdir)
  if jax.process_index() == 0:
    print(json.dumps(metrics, indent=2, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
