"""Image-text retrieval (Flickr30K / COCO Karpathy protocol), ranked by the ITM score.

Training, per batch of B matched pairs (one random caption per image):
  * hard negatives from the batch: for each image the highest-scoring caption of another
    image, for each caption the highest-scoring other image; scored either by the ITM head
    itself (`config.loss.hard_negatives='itm'`, B^2 joint passes without gradient) or by the
    first-stage similarity ('cosine', 2B unimodal passes, as ALBEF mines);
  * ITM cross-entropy over the B positives and the 2B hard negatives (`config.loss.itm`);
  * optionally (`config.loss.contrastive` > 0) a symmetric InfoNCE loss on the first-stage
    similarity, the cosine of mean-pooled image-only and text-only encoder outputs with a
    fixed temperature, so that the evaluation filter is trained too.
Rows showing the same image are never each other's negatives.

Evaluation over N images and their captions (the first `config.eval.captions_per_image`):
the backbone runs once per image and its visual tokens are reused by every pair; with
`config.eval.retrieval_top_k` = k > 0 each image re-ranks only its k most similar captions
and each caption its k most similar images (first-stage cosine), so the ITM head scores at
most k (N + T) pairs instead of N x T; k = 0 ranks every pair. What a query does not
re-rank ranks after all its candidates, tied (ties count against the ground truth).
Recall@1/5/10 both ways and their sum. The ranking itself is model-free, in
`e2e_vlp.eval.retrieval` (`candidate_pairs`, `recall_from_candidates`).

The joint pass on cached visual tokens uses `E2EVLP.joint_visual_tokens` / `joint`, the
same code as `E2EVLP.itm_score`, split where the image side can be reused.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from e2e_vlp.data import finetune_pipelines
from e2e_vlp.eval import retrieval as retrieval_eval
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.models.e2e_vlp import init_inputs
from e2e_vlp.tasks import common
from e2e_vlp.train import mesh as mesh_lib

MINING = ('itm', 'cosine')


# ------------------------------------------------------------------ model pieces (methods)


def match_logits(module: E2EVLP, text_ids: jax.Array, text_mask: jax.Array, tokens: jax.Array,
                 visual_mask: jax.Array, *, train: bool) -> jax.Array:
  """ITM logits [B, 2] of ([CLS] text [SEP], visual tokens) pairs, float32."""
  joint = module.joint(text_ids, text_mask, tokens, visual_mask, train=train)
  return module.itm_head(module.pooler(joint)).astype(jnp.float32)


def _masked_mean_normalized(hidden: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, S, D], [B, S] -> L2-normalised mean of the real positions [B, D] float32."""
  weights = mask.astype(jnp.float32)[..., None]
  mean = (hidden.astype(jnp.float32) * weights).sum(axis=1) / jnp.maximum(
      weights.sum(axis=1), 1.0)
  return mean / jnp.maximum(jnp.linalg.norm(mean, axis=-1, keepdims=True), 1e-6)


def image_embedding(module: E2EVLP, tokens: jax.Array, visual_mask: jax.Array, *,
                    train: bool) -> jax.Array:
  """First-stage image vector [B, D]: the joint encoder over the image side alone, mean-pooled.

  With joint_fusion='cross_attention' the joint pass has no encoder of its own; `encoder`
  then serves the first stage only, and a pre-training checkpoint does not initialise it.
  """
  return _masked_mean_normalized(module.encoder(tokens, visual_mask, deterministic=not train),
                                 visual_mask)


def text_embedding(module: E2EVLP, text_ids: jax.Array, text_mask: jax.Array, *,
                   train: bool) -> jax.Array:
  """First-stage text vector [B, D]: the text-only encoder output, mean-pooled."""
  hidden = module.encoder(module.embeddings(text_ids, train=train), text_mask,
                          deterministic=not train)
  return _masked_mean_normalized(hidden, text_mask)


def hard_negatives(scores: jax.Array, same: jax.Array
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """The hardest negative of each image and of each caption.

  Args:
    scores: [B, B] image (row) x caption (column) scores.
    same: [B, B] bool, true where the row's and the column's image are the same.

  Returns:
    (caption index per image [B], whether it exists [B], image index per caption [B],
    whether it exists [B]).
  """
  masked = jnp.where(same, -jnp.inf, scores)
  return (jnp.argmax(masked, axis=1), jnp.any(~same, axis=1),
          jnp.argmax(masked, axis=0), jnp.any(~same, axis=0))


def contrastive_loss(similarity: jax.Array, same: jax.Array, temperature: float) -> jax.Array:
  """Symmetric InfoNCE on [B, B] cosines; every caption of the same image is a positive."""
  targets = same.astype(jnp.float32)
  logits = similarity / temperature
  i2t = optax.softmax_cross_entropy(logits, targets / targets.sum(axis=1, keepdims=True))
  t2i = optax.softmax_cross_entropy(logits.T, targets.T / targets.T.sum(axis=1, keepdims=True))
  return 0.5 * (i2t.mean() + t2i.mean())


def retrieval_outputs(module: E2EVLP, batch: dict[str, jax.Array], *, train: bool,
                      mining: str, contrastive: bool) -> dict[str, jax.Array]:
  """Training forward: ITM logits of positives and mined negatives, and the similarity.

  Returns:
    itm_logits [3B, 2], itm_label [3B] (B ones, then 2B zeros), itm_weight [3B] (0 for a
    missing negative), and similarity [B, B] when the cosine is needed.
  """
  tokens, visual_mask = module.joint_visual_tokens(batch['image'], batch['image_mask'],
                                                   train=train)
  ids, mask, group = batch['text_ids'], batch['text_mask'], batch['image_group']
  b = ids.shape[0]
  out = {}
  if contrastive or mining == 'cosine':
    out['similarity'] = (image_embedding(module, tokens, visual_mask, train=train)
                         @ text_embedding(module, ids, mask, train=train).T)
  if mining == 'itm':
    rows, cols = jnp.repeat(jnp.arange(b), b), jnp.tile(jnp.arange(b), b)
    logits = match_logits(module, ids[cols], mask[cols], tokens[rows], visual_mask[rows],
                          train=False)
    scores = (logits[:, 1] - logits[:, 0]).reshape(b, b)
  else:
    scores = out['similarity']
  hard_text, has_text, hard_image, has_image = hard_negatives(
      jax.lax.stop_gradient(scores), group[:, None] == group[None, :])
  index = jnp.arange(b)
  images = jnp.concatenate([index, index, hard_image])
  texts = jnp.concatenate([index, hard_text, index])
  out['itm_logits'] = match_logits(module, ids[texts], mask[texts], tokens[images],
                                   visual_mask[images], train=train)
  out['itm_label'] = jnp.concatenate([jnp.ones(b, jnp.int32), jnp.zeros(2 * b, jnp.int32)])
  out['itm_weight'] = jnp.concatenate([jnp.ones(b), has_text, has_image]).astype(jnp.float32)
  return out


def retrieval_loss(outputs: dict[str, jax.Array], group: jax.Array,
                   loss_config: ml_collections.ConfigDict) -> tuple[jax.Array,
                                                                   dict[str, jax.Array]]:
  """`loss.itm` x weighted ITM cross-entropy + `loss.contrastive` x InfoNCE."""
  logits, labels, weight = outputs['itm_logits'], outputs['itm_label'], outputs['itm_weight']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  itm = (ce * weight).sum() / jnp.maximum(weight.sum(), 1.0)
  metrics = {'itm_loss': itm,
             'itm_accuracy': (correct * weight).sum() / jnp.maximum(weight.sum(), 1.0)}
  total = loss_config.itm * itm
  if loss_config.contrastive:
    same = group[:, None] == group[None, :]
    itc = contrastive_loss(outputs['similarity'], same, loss_config.temperature)
    metrics['contrastive_loss'] = itc
    total = total + loss_config.contrastive * itc
  return total, metrics


# ------------------------------------------------------------------------ evaluation


def _encode_gallery_batch(model: E2EVLP, variables, batch) -> dict[str, jax.Array]:
  """Visual tokens, first-stage image vectors and [b, C, D] caption vectors of a batch."""
  def encode(module: E2EVLP, batch):
    tokens, visual_mask = module.joint_visual_tokens(batch['image'], batch['image_mask'],
                                                     train=False)
    b, c, length = batch['text_ids'].shape
    text = text_embedding(module, batch['text_ids'].reshape(b * c, length),
                          batch['text_mask'].reshape(b * c, length), train=False)
    return {'tokens': tokens, 'visual_mask': visual_mask,
            'image_emb': image_embedding(module, tokens, visual_mask, train=False),
            'text_emb': text.reshape(b, c, -1)}
  return model.apply(variables, batch, method=encode)


def _pair_scores(model: E2EVLP, variables, tokens, visual_mask, text_ids, text_mask
                 ) -> jax.Array:
  """ITM score (logit 'match' - 'no match') [P] of cached visual tokens and texts."""
  logits = model.apply(variables, text_ids, text_mask, tokens, visual_mask, train=False,
                       method=match_logits)
  return logits[:, 1] - logits[:, 0]


class Task:
  """Retrieval fine-tuning and evaluation (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict):
    if config.loss.hard_negatives not in MINING:
      raise ValueError(f'config.loss.hard_negatives={config.loss.hard_negatives!r}: use one '
                       f'of {MINING}.')
    if config.eval.retrieval_top_k < 0:
      raise ValueError(f'config.eval.retrieval_top_k={config.eval.retrieval_top_k} must be '
                       '>= 0 (0 ranks every pair).')
    self.config = config
    self.data = common.resolve_data(config)
    self.tokenizer = self.data.tokenizer
    self.model = E2EVLP(config.model)
    self._encode_fn = common.jit_eval(functools.partial(_encode_gallery_batch, self.model))
    self._score_fn = common.jit_eval(functools.partial(_pair_scores, self.model))
    # The training forward, as init and the loss both run it.
    self._outputs = functools.partial(retrieval_outputs, mining=config.loss.hard_negatives,
                                      contrastive=bool(config.loss.contrastive))

  # ------------------------------------------------------------------------- training
  def batch_spec(self, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    d = self.config.data
    s, l = d.image_size, d.max_text_len
    spec = {'image': ((s, s, 3), jnp.float32), 'image_mask': ((s, s), jnp.bool_),
            'text_ids': ((l,), jnp.int32), 'text_mask': ((l,), jnp.bool_),
            'image_group': ((), jnp.int32)}
    return {k: jax.ShapeDtypeStruct((batch_size,) + shape, dtype)
            for k, (shape, dtype) in spec.items()}

  def init_variables(self, rng: jax.Array):
    # Through the training forward: with joint_fusion='cross_attention' the first-stage
    # encoder (`encoder`, see image_embedding) is used by retrieval alone.
    batch = init_inputs(self.config.model, self.batch_spec(2))
    return self.model.init({'params': rng, 'dropout': rng}, batch, train=False,
                           method=self._outputs)

  def loss_fn(self, params, constants, batch, rng):
    outputs = self.model.apply({'params': params, **constants}, batch, train=True,
                               rngs={'dropout': rng}, method=self._outputs)
    return retrieval_loss(outputs, batch['image_group'], self.config.loss)

  def train_iterator(self, *, seed: int):
    return finetune_pipelines.make_pair_iterator(
        self.config.data, self.tokenizer, split=self.config.data.train_split, train=True,
        global_batch_size=self.config.train.batch_size, seed=seed,
        dataset=self.data.dataset, data_dir=self.data.data_dir)

  # ----------------------------------------------------------------------- evaluation
  def encode_gallery(self, variables, *, mesh, rules, split: str) -> dict[str, np.ndarray]:
    """Visual tokens and first-stage vectors of every image and caption of `split`.

    Returns (host arrays): tokens [I, N, D], visual_mask [I, N], image_emb [I, D],
    text_ids / text_mask [T, L], text_emb [T, D], text_to_image [T], image_id [I].
    """
    e = self.config.eval
    batches = finetune_pipelines.make_gallery_iterator(
        self.config.data, self.tokenizer, captions_per_image=e.captions_per_image, split=split,
        global_batch_size=common.eval_batch_size(self.config, mesh),
        seed=self.config.data.seed, dataset=self.data.dataset, data_dir=self.data.data_dir)
    out = common.run_eval(self._encode_fn, variables, batches,
                          inputs=('image', 'image_mask', 'text_ids', 'text_mask'),
                          keep=('image_id', 'caption_valid', 'text_ids', 'text_mask'),
                          mesh=mesh, rules=rules, num_batches=e.num_batches)
    valid = out.pop('caption_valid')
    out['text_to_image'] = np.nonzero(valid)[0]
    for key in ('text_ids', 'text_mask', 'text_emb'):
      out[key] = out[key][valid]
    return out

  def score_pairs(self, variables, gallery: dict[str, np.ndarray], images: np.ndarray,
                  texts: np.ndarray, *, mesh, rules) -> np.ndarray:
    """ITM scores (logit 'match' - 'no match') [P] of the (image, text) index pairs."""
    size = int(self.config.eval.pair_batch_size)
    mesh_lib.check_batch_size(size, mesh, 'config.eval.pair_batch_size')
    scores = []
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for start in range(0, len(images), size):
        count = len(images[start:start + size])
        # The last chunk is filled up to the static size by repeating its pairs; cut after.
        rows_i = np.resize(images[start:start + size], size)
        rows_t = np.resize(texts[start:start + size], size)
        inputs = [common.global_input(x, mesh) for x in (
            gallery['tokens'][rows_i], gallery['visual_mask'][rows_i],
            gallery['text_ids'][rows_t], gallery['text_mask'][rows_t])]
        scores.append(common.gather(self._score_fn(variables, *inputs))[:count])
    return np.concatenate(scores) if scores else np.zeros([0], np.float32)

  def evaluate(self, params, constants, *, step: int, workdir: str, mesh, rules
               ) -> dict[str, Any]:
    del step, workdir  # recall is the result; nothing to write
    variables = {'params': params, **constants}
    gallery = self.encode_gallery(variables, mesh=mesh, rules=rules,
                                  split=self.config.data.eval_split)
    similarity = gallery['image_emb'] @ gallery['text_emb'].T  # [I, T]
    i2t, t2i = retrieval_eval.candidate_pairs(similarity,
                                              int(self.config.eval.retrieval_top_k))
    images, texts = np.nonzero(i2t | t2i)
    scores = np.full(similarity.shape, -np.inf)
    scores[images, texts] = self.score_pairs(variables, gallery, images, texts, mesh=mesh,
                                             rules=rules)
    metrics = retrieval_eval.recall_from_candidates(scores, i2t, t2i,
                                                    gallery['text_to_image'])
    metrics['retrieval_images'] = float(similarity.shape[0])
    metrics['retrieval_pairs_scored'] = float(len(images))
    return metrics
