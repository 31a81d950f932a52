"""NLVR2: is a statement true of a pair of images?

The statement is encoded with each image ([CLS] text [SEP] + visual tokens); the two pooled
[CLS] vectors are concatenated into a two-way classifier (`E2EVLP.nlvr2_logits`, as UNITER's
pair setting). Training: cross-entropy; evaluation: accuracy on `config.data.eval_split`
(dev = 'val', test-P = 'test').
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from e2e_vlp.data import finetune_pipelines
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.e2e_vlp import init_inputs
from e2e_vlp.tasks import common

INPUTS = ('image0', 'image0_mask', 'image1', 'image1_mask', 'text_ids', 'text_mask')


def nlvr2_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy of logits [B, 2] against labels [B] (1 = true)."""
  logits = logits.astype(jnp.float32)
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  accuracy = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32).mean()
  return loss, {'nlvr2_loss': loss, 'nlvr2_accuracy': accuracy}


def _predict(model: E2EVLP, variables, batch) -> dict[str, jax.Array]:
  return {'prediction': jnp.argmax(model.apply(variables, batch, method=E2EVLP.nlvr2_logits),
                                   axis=-1)}


class Task:
  """NLVR2 fine-tuning and evaluation (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.data = common.resolve_data(config)
    self.tokenizer = self.data.tokenizer
    self.model = E2EVLP(config.model)
    self._predict_fn = common.jit_eval(functools.partial(_predict, self.model))

  # ------------------------------------------------------------------------- training
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    d = self.config.data
    s, l = d.image_size, d.max_text_len
    spec = {'text_ids': ((l,), jnp.int32), 'text_mask': ((l,), jnp.bool_),
            'label': ((), jnp.int32)}
    for i in (0, 1):
      spec[f'image{i}'] = ((s, s, 3), jnp.float32)
      spec[f'image{i}_mask'] = ((s, s), jnp.bool_)
    return {k: jax.ShapeDtypeStruct((batch_size,) + shape, dtype)
            for k, (shape, dtype) in spec.items()}

  def init_variables(self, rng: jax.Array):
    batch = init_inputs(self.config.model, self.batch_spec(1))
    return self.model.init({'params': rng, 'dropout': rng}, batch, method=E2EVLP.nlvr2_logits)

  def loss_fn(self, params, constants, batch, rng):
    logits = self.model.apply({'params': params, **constants}, batch, train=True,
                              rngs={'dropout': rng}, method=E2EVLP.nlvr2_logits)
    return nlvr2_loss(logits, batch['label'])

  def _iterator(self, *, split: str, train: bool, batch_size: int, seed: int):
    return finetune_pipelines.make_nlvr2_iterator(
        self.config.data, self.tokenizer, split=split, train=train,
        global_batch_size=batch_size, seed=seed, dataset=self.data.dataset,
        data_dir=self.data.data_dir)

  def train_iterator(self, *, seed: int):
    return self._iterator(split=self.config.data.train_split, train=True,
                          batch_size=self.config.train.batch_size, seed=seed)

  # ----------------------------------------------------------------------- evaluation
  def evaluate(self, params, constants, *, step: int, workdir: str, mesh, rules
               ) -> dict[str, Any]:
    del step, workdir  # nothing to write: NLVR2 is scored by accuracy alone
    batches = self._iterator(split=self.config.data.eval_split, train=False,
                             batch_size=common.eval_batch_size(self.config, mesh),
                             seed=self.config.data.seed)
    out = common.run_eval(self._predict_fn, {'params': params, **constants}, batches, inputs=INPUTS,
                          keep=('label',), mesh=mesh, rules=rules,
                          num_batches=self.config.eval.num_batches)
    return {'nlvr2_accuracy': 100.0 * float(np.mean(out['prediction'] == out['label'])),
            'nlvr2_examples': float(len(out['label']))}
