"""Fine-tuning tasks end to end on the embedded corpus, and their pieces against references.

Each task trains 2 steps through the real loop (`loop.run`) on a shrunk model and evaluates;
its output files are read back with the official tools (pycocotools `loadRes` against the
corpus' own COCO files, the VQA submission against the corpus' VQA annotations).
"""

import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocoevalcap import eval as pycocoevalcap_eval
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from configs import caption as caption_config
from configs import nlvr2 as nlvr2_config
from configs import pretrain as pretrain_config
from configs import retrieval as retrieval_config
from configs import vqa as vqa_config
from e2e_vlp import tasks
from e2e_vlp.data import builders
from e2e_vlp.data import finetune_pipelines
from e2e_vlp.eval import retrieval as retrieval_eval
from e2e_vlp.eval import vqa as vqa_eval
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.tasks import retrieval
from e2e_vlp.tasks import vqa
from e2e_vlp.train import checkpoint as ckpt_lib
from e2e_vlp.train import loop
from e2e_vlp.train import mesh as mesh_lib
from e2e_vlp.train import sharding
from e2e_vlp.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'launch'))
import eval as eval_script  # pylint: disable=g-import-not-at-top,wrong-import-position

CORPUS = dict(num_train=64, num_val=16, seed=0, image_size=96)
VOCAB = 256
DATASETS = ('embedded', 'embedded_vqa', 'embedded_nlvr2', 'embedded_retrieval')


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  """One prepared corpus (64 train / 16 val images) shared by every test here."""
  path = tmp_path_factory.mktemp('cache')
  builders.prepare_embedded(path, vocab_size=VOCAB, datasets=DATASETS, **CORPUS)
  return str(path)


def _raw(cache_dir: str, *parts: str) -> str:
  key = builders._corpus_key(**CORPUS)  # pylint: disable=protected-access
  return os.path.join(cache_dir, 'raw', key, *parts)


def _shrink(config, cache_dir: str):
  """The `tiny` config shrunk so that a step compiles in seconds: 2 steps, batch 8."""
  m, d, t = config.model, config.data, config.train
  m.d_model, m.num_heads, m.mlp_dim = 16, 2, 32
  m.encoder_layers = m.decoder_layers = m.caption_decoder_layers = m.fusion_layers = 1
  m.num_queries, m.vocab_size = 8, VOCAB
  m.backbone.width = 4
  d.image_size, d.resize_sizes, d.max_size = 64, (64,), 64
  d.max_text_len = d.max_caption_len = 16
  d.corpus_train_images, d.corpus_val_images = CORPUS['num_train'], CORPUS['num_val']
  d.shuffle_buffer, d.prefetch = 64, 1
  t.batch_size, t.total_steps, t.log_every = 8, 2, 1
  t.eval_every = t.checkpoint_every = 2
  t.num_visualize = 0
  if 'eval' in config:
    config.eval.batch_size = 8
  config.cache_dir = cache_dir
  return config


# ------------------------------------------------------------------------ pieces


def test_vqa_loss_is_soft_bce_summed_over_answers():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5)).astype(np.float32)
  scores = rng.choice([0.0, 0.3, 0.6, 1.0], size=(3, 5)).astype(np.float32)
  loss, metrics = vqa.vqa_loss(jnp.asarray(logits), jnp.asarray(scores))
  p = 1 / (1 + np.exp(-logits.astype(np.float64)))
  bce = -(scores * np.log(p) + (1 - scores) * np.log(1 - p))
  np.testing.assert_allclose(float(loss), bce.sum(axis=1).mean(), rtol=1e-5)
  best = scores[np.arange(3), logits.argmax(axis=1)].mean()
  np.testing.assert_allclose(float(metrics['vqa_score']), best, rtol=1e-6)


def test_hard_negatives_skip_own_image_and_pick_the_highest():
  scores = jnp.asarray([[9.0, 1.0, 3.0, 2.0],
                        [5.0, 9.0, 0.0, 7.0],
                        [4.0, 8.0, 9.0, 6.0],
                        [1.0, 2.0, 0.5, 9.0]])
  group = jnp.asarray([10, 11, 12, 11])  # rows 1 and 3 show the same image
  text, has_text, image, has_image = retrieval.hard_negatives(
      scores, group[:, None] == group[None, :])
  # Image 1 may not take caption 3 (same image): its best other is caption 0.
  assert text.tolist() == [2, 0, 1, 0]
  assert image.tolist() == [1, 2, 0, 2]
  assert has_text.all() and has_image.all()
  _, none, _, _ = retrieval.hard_negatives(scores, jnp.ones((4, 4), bool))
  assert not none.any()


def test_contrastive_loss_matches_numpy_infonce():
  rng = np.random.default_rng(1)
  sim = rng.uniform(-1, 1, (4, 4)).astype(np.float32)
  group = np.array([0, 1, 1, 2])
  same = group[:, None] == group[None, :]
  got = float(retrieval.contrastive_loss(jnp.asarray(sim), jnp.asarray(same), 0.1))

  def xent(logits, targets):
    logits = logits - logits.max(axis=1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    return -(targets / targets.sum(axis=1, keepdims=True) * logp).sum(axis=1).mean()

  want = 0.5 * (xent(sim / 0.1, same) + xent(sim.T / 0.1, same.T))
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------- end to end


def test_vqa_trains_evaluates_and_writes_the_submission(cache_dir, tmp_path):
  config = _shrink(vqa_config.get_config('tiny'), cache_dir)
  workdir = str(tmp_path / 'vqa')
  result = loop.run(config, workdir)
  assert result['step'] == 2 and np.isfinite(result['vqa_loss'])

  with open(os.path.join(workdir, 'vqa_submission_val_step2.json')) as f:
    submission = json.load(f)
  with open(_raw(cache_dir, 'annotations', 'v2_mscoco_val2014_annotations.json')) as f:
    annotations = json.load(f)['annotations']
  answers = builders.load_answer_vocab(
      builders.get_builder('embedded_vqa', os.path.join(
          cache_dir, 'tfds', builders._corpus_key(**CORPUS))))  # pylint: disable=protected-access
  assert sorted(r['question_id'] for r in submission) == sorted(
      a['question_id'] for a in annotations)
  assert all(set(r) == {'question_id', 'answer'} and r['answer'] in answers
             for r in submission)
  # The logged accuracy is the official one of the written file against the raw annotations.
  by_id = {a['question_id']: a['answers'] for a in annotations}
  official = 100 * np.mean([vqa_eval.question_accuracy(r['answer'], by_id[r['question_id']])
                            for r in submission])
  np.testing.assert_allclose(result['eval/vqa_accuracy'], official, rtol=1e-9)

  # launch/eval.py on the same checkpoint gives the same numbers.
  again = eval_script.evaluate_checkpoint(config, workdir)
  assert again['step'] == 2
  np.testing.assert_allclose(again['vqa_accuracy'], official, rtol=1e-9)
  assert os.path.exists(os.path.join(workdir, 'eval_val_step2.json'))


def test_nlvr2_trains_and_evaluates_on_every_dev_pair(cache_dir, tmp_path):
  config = _shrink(nlvr2_config.get_config('tiny'), cache_dir)
  result = loop.run(config, str(tmp_path / 'nlvr2'))
  with open(_raw(cache_dir, 'nlvr2', 'dev.json')) as f:
    dev = [json.loads(line) for line in f if line.strip()]
  assert result['eval/nlvr2_examples'] == len(dev)
  correct = result['eval/nlvr2_accuracy'] * len(dev) / 100
  assert 0 <= result['eval/nlvr2_accuracy'] <= 100 and abs(correct - round(correct)) < 1e-9


class _NoSpice:
  """Stands in for pycocoevalcap's SPICE, which downloads Stanford CoreNLP (offline here)."""

  def method(self) -> str:
    return 'SPICE'

  def compute_score(self, gts, res):
    del res
    return float('nan'), [float('nan')] * len(gts)


def test_caption_metrics_are_pycocoevalcap_on_the_written_results(cache_dir, tmp_path,
                                                                  monkeypatch):
  config = _shrink(caption_config.get_config('tiny'), cache_dir)
  config.eval.max_len, config.eval.beam_size = 8, 2
  assert config.eval.meteor  # the default: METEOR's Java scorer runs
  workdir = str(tmp_path / 'caption')
  result = loop.run(config, workdir)
  assert result['eval/SPICE'] is None  # unavailable offline, reported as such

  with open(_raw(cache_dir, 'dataset_embedded.json')) as f:
    val_ids = {im['cocoid'] for im in json.load(f)['images'] if im['split'] == 'val'}
  gt = COCO(_raw(cache_dir, 'annotations', 'captions_val2014.json'))
  res = gt.loadRes(os.path.join(workdir, 'caption_results_val_step2.json'))
  assert set(res.getImgIds()) == val_ids
  assert all(isinstance(a['caption'], str) for a in res.dataset['annotations'])
  # Independent reference: the official driver on the written file and the corpus' own
  # COCO references (the run read them from the Karpathy JSON through TFDS), SPICE left out.
  monkeypatch.setattr(pycocoevalcap_eval, 'Spice', _NoSpice)
  official = pycocoevalcap_eval.COCOEvalCap(gt, res)
  official.params['image_id'] = res.getImgIds()
  official.evaluate()
  assert result['eval/caption_images'] == len(val_ids)
  for name in ('Bleu_1', 'Bleu_2', 'Bleu_3', 'Bleu_4', 'METEOR', 'ROUGE_L', 'CIDEr'):
    assert np.isfinite(result[f'eval/{name}']), name
    np.testing.assert_allclose(result[f'eval/{name}'], official.eval[name], rtol=1e-9,
                               atol=1e-12, err_msg=name)


def test_retrieval_ranking_matches_exhaustive_itm_and_top_k_filters(cache_dir, tmp_path):
  config = _shrink(retrieval_config.get_config('tiny'), cache_dir)
  # Exact rankings need distinct scores: after 2 steps tiny's cross-attention fusion scores
  # every pair within 4e-5 of each other (neighbours 1e-8 apart), so float noise between
  # batched and exhaustive scoring would reorder ties; the merged encoder spreads them.
  config.model.joint_fusion = 'merged'
  config.eval.pair_batch_size = 64
  config.eval.retrieval_top_k = 1000  # >= the gallery (8 images, 40 captions): every pair
  workdir = str(tmp_path / 'retrieval')
  result = loop.run(config, workdir)
  assert np.isfinite(result['itm_loss']) and np.isfinite(result['contrastive_loss'])

  # Independent reference: every (image, caption) pair through E2EVLP.itm_score on pixels.
  task = tasks.get_task(config)
  _, source = ckpt_lib.load_params(workdir)
  variables = jax.tree.map(np.asarray, {'params': source['params'], **source['constants']})
  batches = list(finetune_pipelines.make_gallery_iterator(
      config.data, task.tokenizer, captions_per_image=5, split='val', global_batch_size=8,
      dataset=task.data.dataset, data_dir=task.data.data_dir))
  cat = lambda key: np.concatenate([b[key] for b in batches])
  valid = cat('caption_valid')
  text_ids, text_mask = cat('text_ids')[valid], cat('text_mask')[valid]
  text_to_image = np.nonzero(valid)[0]
  num_images, num_texts = len(valid), len(text_ids)
  rows = np.repeat(np.arange(num_images), num_texts)
  cols = np.tile(np.arange(num_texts), num_images)
  score = jax.jit(lambda v, b: task.model.apply(v, b, method=E2EVLP.itm_score))
  exhaustive = np.asarray(score(variables, {
      'image': cat('image')[rows], 'image_mask': cat('image_mask')[rows],
      'text_ids': text_ids[cols], 'text_mask': text_mask[cols]}))
  want = retrieval_eval.retrieval_recall(exhaustive.reshape(num_images, num_texts),
                                         text_to_image)
  assert result['eval/retrieval_pairs_scored'] == num_images * num_texts
  assert {k: result[f'eval/{k}'] for k in want} == pytest.approx(want)

  # With k = 2 only the first-stage top 2 of each query get an ITM pass, and each query
  # ranks them by the exhaustive ITM scores (the ranking itself is checked against brute
  # force in tests/test_eval_retrieval.py).
  config.eval.retrieval_top_k = 2
  mesh = mesh_lib.make_mesh({'data': 1, 'fsdp': 1, 'model': 1}, devices=jax.devices()[:1])
  rules = sharding.logical_axis_rules('dp')
  params, constants = state_lib.split_variables(variables)
  got = task.evaluate(params, constants, step=2, workdir=workdir, mesh=mesh, rules=rules)
  gallery = task.encode_gallery(variables, mesh=mesh, rules=rules, split='val')
  np.testing.assert_array_equal(gallery['text_to_image'], text_to_image)
  i2t, t2i = retrieval_eval.candidate_pairs(gallery['image_emb'] @ gallery['text_emb'].T, 2)
  assert got['retrieval_pairs_scored'] == (i2t | t2i).sum() < num_images * num_texts
  want = retrieval_eval.recall_from_candidates(exhaustive.reshape(num_images, num_texts),
                                               i2t, t2i, text_to_image)
  assert {k: got[k] for k in want} == pytest.approx(want)
  # Two candidates per image: its captions are found at rank 0 or 1, or after all 40.
  assert got['i2t_r5'] == got['i2t_r10']


def test_eval_script_writes_detections_in_the_official_frame(cache_dir, tmp_path):
  config = _shrink(pretrain_config.get_config('tiny'), cache_dir)
  config.train.eval_batches = 2  # the whole 16-image val split
  workdir = str(tmp_path / 'pretrain')
  task = tasks.get_task(config)
  params, constants = state_lib.split_variables(
      jax.jit(lambda rng: nn.meta.unbox(task.init_variables(rng)))(jax.random.key(0)))
  state = state_lib.TrainState(step=jnp.int32(0), params=params, constants=constants,
                               opt_state=(), skipped=jnp.int32(0))
  checkpointer = ckpt_lib.Checkpointer(workdir, keep=1)
  checkpointer.save(7, state, force=True)
  checkpointer.close()

  metrics = eval_script.evaluate_checkpoint(config, workdir)
  assert metrics['step'] == 7 and np.isfinite(metrics['mlm_accuracy'])
  # Against the corpus' official instances file: category ids there are index + 1.
  gt = COCO(_raw(cache_dir, 'annotations', 'instances_val2014.json'))
  with open(os.path.join(workdir, 'detections_val_step7.json')) as f:
    results = json.load(f)
  assert {r['image_id'] for r in results} == set(gt.getImgIds())
  boxes = np.array([r['bbox'] for r in results])
  assert boxes[:, 2:].max() <= 96 * 1.0001  # the stored 96-pixel frame, not the 64 canvas
  coco_eval = COCOeval(gt, gt.loadRes([dict(r, category_id=r['category_id'] + 1)
                                       for r in results]), iouType='bbox')
  coco_eval.evaluate()
  coco_eval.accumulate()
  coco_eval.summarize()
  np.testing.assert_allclose(metrics['detection_ap'], max(coco_eval.stats[0], 0.0), atol=1e-6)
  np.testing.assert_allclose(metrics['detection_ap50'], max(coco_eval.stats[1], 0.0), atol=1e-6)
