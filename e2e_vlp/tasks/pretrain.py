"""Pre-training: MLM + ITM on the cross-modal encoder, detection + captioning on the decoder.

Evaluation on the held-out split reports MLM / ITM / caption-token accuracy, COCO detection
AP and AP50 (pycocotools), and draws predicted boxes and a greedy caption on a few images
into `<workdir>/eval_<step>.png`.
"""

import os
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from e2e_vlp import decoding
from e2e_vlp.data import pipeline
from e2e_vlp.data import prepare
from e2e_vlp.eval import coco_detection
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.e2e_vlp import init_inputs
from e2e_vlp.tasks import visualize
from e2e_vlp.tasks.pretrain_objective import batch_shapes, pretrain_losses
from e2e_vlp.train import mesh as mesh_lib


class Task:
  """Pre-training on the embedded corpus or a prepared TFDS image-text dataset."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.data = prepare.resolve(config)
    self.tokenizer = self.data.tokenizer
    if self.tokenizer.vocab_size > config.model.vocab_size:
      raise ValueError(
          f'The tokenizer has {self.tokenizer.vocab_size} tokens but config.model.vocab_size='
          f'{config.model.vocab_size}; raise config.model.vocab_size.')
    self.model = E2EVLP(config.model)
    self._eval_fn = _eval_fn(self.model)  # built once: every evaluation reuses its compilation

  # ------------------------------------------------------------------------- training
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    return batch_shapes(self.config, batch_size)

  def init_variables(self, rng: jax.Array):
    batch = init_inputs(self.config.model, self.batch_spec(1))
    return self.model.init({'params': rng, 'dropout': rng}, batch, train=False)

  def loss_fn(self, params, constants, batch, rng):
    outputs = self.model.apply({'params': params, **constants}, batch, train=True,
                               rngs={'dropout': rng})
    return pretrain_losses(outputs, batch, self.config)

  def train_iterator(self, *, seed: int):
    return pipeline.make_pretrain_dataset(
        self.config.data, self.tokenizer, data_dir=self.data.data_dir,
        split=self.config.data.train_split, train=True,
        global_batch_size=self.config.train.batch_size, seed=seed)

  # ----------------------------------------------------------------------- evaluation
  def evaluate(self, params, constants, *, step: int, workdir: str, mesh, rules
               ) -> dict[str, float]:
    config = self.config
    eval_iter = pipeline.make_pretrain_dataset(
        config.data, self.tokenizer, data_dir=self.data.data_dir,
        split=config.data.eval_split, train=False,
        global_batch_size=config.train.batch_size, seed=config.data.seed)
    variables = {'params': params, **constants}
    eval_fn = self._eval_fn
    sums: dict[str, float] = {}
    det: dict[str, list[np.ndarray]] = {k: [] for k in (
        'class_logits', 'boxes', 'gt_boxes', 'labels', 'box_mask', 'sizes', 'valid')}
    first_batch = None
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for _, local in zip(range(config.train.eval_batches), eval_iter):
        valid = local.pop('valid', np.ones(local['image'].shape[0], bool))
        local.pop('skipped_records', None)
        # Global arrays from every host's rows, as in training (host-local numpy would be
        # taken as replicated: each host would evaluate only its own rows).
        batch = mesh_lib.global_batch(
            {**{k: local[k] for k in self.batch_spec(1)}, 'valid': valid}, mesh)
        counts, outputs = eval_fn(variables, batch, batch.pop('valid'))
        for key, value in jax.device_get(counts).items():
          sums[key] = sums.get(key, 0.0) + float(value)
        outputs = multihost_utils.process_allgather(outputs, tiled=True)
        gathered = multihost_utils.process_allgather(
            {'boxes': local['boxes'], 'labels': local['labels'], 'box_mask': local['box_mask'],
             'image_mask': local['image_mask'], 'valid': valid}, tiled=True)
        det['class_logits'].append(outputs['class_logits'])
        det['boxes'].append(outputs['boxes'])
        det['gt_boxes'].append(gathered['boxes'])
        det['labels'].append(gathered['labels'])
        det['box_mask'].append(gathered['box_mask'])
        det['sizes'].append(visualize.real_sizes(gathered['image_mask']))
        det['valid'].append(gathered['valid'])
        if first_batch is None:
          first_batch = (local, outputs)
    metrics = {name: sums[f'{name}_correct'] / max(sums[f'{name}_count'], 1.0)
               for name in ('mlm', 'itm', 'itm_masked_text', 'caption_token',
                            'blind_caption_token')
               if f'{name}_count' in sums}
    metrics = {f'{k}_accuracy': v for k, v in metrics.items()}
    metrics.update(self._detection_metrics({k: np.concatenate(v) for k, v in det.items()}))
    if jax.process_index() == 0 and first_batch is not None and config.train.num_visualize:
      self._visualize(variables, first_batch, step, workdir, mesh, rules)
    return metrics

  def _detection_metrics(self, det: dict[str, np.ndarray]) -> dict[str, float]:
    keep = det.pop('valid').astype(bool)
    det = {k: v[keep] for k, v in det.items()}
    image_ids = np.arange(len(det['sizes']))
    coco_gt = coco_detection.coco_ground_truth(
        image_ids, det['sizes'], det['gt_boxes'], det['labels'], det['box_mask'],
        category_names=self.data.class_names)
    results = coco_detection.detection_results(det['class_logits'], det['boxes'],
                                               det['sizes'], image_ids)
    scores = coco_detection.evaluate_detections(coco_gt, results)
    return {'detection_ap': scores['AP'], 'detection_ap50': scores['AP50']}

  def _visualize(self, variables, first_batch, step, workdir, mesh, rules):
    local, outputs = first_batch
    n = min(self.config.train.num_visualize, local['image'].shape[0])
    images = {k: local[k][:n] for k in ('image', 'image_mask')}
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      tokens = decoding.greedy_captions(self.model, variables, images['image'],
                                        images['image_mask'], self.tokenizer,
                                        max_len=self.config.data.max_caption_len)
    captions = self.tokenizer.detokenize(np.asarray(tokens))
    path = os.path.join(workdir, f'eval_{step}.png')
    visualize.draw_predictions(
        path, images['image'], images['image_mask'], outputs['class_logits'][:n],
        outputs['boxes'][:n], captions, self.data.class_names)


def _eval_fn(model: nn.Module):
  """Jitted: correct/count sums for the accuracies, final-layer detections per image."""

  @jax.jit
  def fn(variables, batch, valid):
    outputs = model.apply(variables, batch, train=False)
    valid = valid.astype(jnp.float32)
    positive = valid * batch['itm_label'].astype(jnp.float32)

    def acc(logits, labels, weights):
      return {'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
              'count': jnp.sum(weights)}

    mlm_w = (batch['mlm_labels'] >= 0) * positive[:, None]
    caption_w = batch['caption_mask'] * valid[:, None]
    # The "blind" baseline: the same captioning with every pixel zeroed, to show how much
    # of the caption accuracy comes from the image rather than from the language prior.
    blind = model.apply(variables, dict(batch, image=jnp.zeros_like(batch['image'])),
                        train=False)
    # ITM is scored on the real text: the MLM corruption is training's, not the task's.
    clean_text = jnp.where(batch['mlm_labels'] >= 0, batch['mlm_labels'], batch['text_ids'])
    itm_logits = model.apply(variables, dict(batch, text_ids=clean_text),
                             train=False)['itm_logits']
    parts = {'mlm': acc(outputs['mlm_logits'], batch['mlm_labels'], mlm_w),
             'itm': acc(itm_logits, batch['itm_label'], valid),
             'itm_masked_text': acc(outputs['itm_logits'], batch['itm_label'], valid),
             'caption_token': acc(outputs['caption_logits'], batch['caption_out'], caption_w),
             'blind_caption_token': acc(blind['caption_logits'], batch['caption_out'],
                                        caption_w)}
    counts = {f'{name}_{k}': v for name, part in parts.items() for k, v in part.items()}
    det = {'class_logits': outputs['det_class_logits'][-1], 'boxes': outputs['det_boxes'][-1]}
    return counts, det

  return fn
