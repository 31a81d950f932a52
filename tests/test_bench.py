"""The benchmark suite's own pieces: timing, flop counts, the GPU script's TF-free mirrors,
the HF DETR peer's backbone, and the GPU script's smoke run.
"""

import json
import os
import subprocess
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fast_compile
from bench import common
from bench import conv_ops
from bench import detr_step
from bench import gpu
from bench import pretrain_step
from bench import run_all
from configs import pretrain
from e2e_vlp.models.e2e_vlp import E2EVLP
from e2e_vlp.tasks import pretrain as pretrain_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FakeSteps:
  """Thunks that advance a fake `common.time.perf_counter` by scripted durations (s)."""

  def __init__(self, monkeypatch, **durations):
    self.clock, self.calls = 0.0, []
    self.script(**durations)
    monkeypatch.setattr(common.time, 'perf_counter', lambda: self.clock)

  def script(self, **durations):
    self.durations = {name: iter(values) for name, values in durations.items()}

  def __getitem__(self, name):
    def fn():
      self.calls.append(name)
      self.clock += next(self.durations[name])
    return fn


def test_time_interleaved_takes_medians_of_interleaved_rounds(monkeypatch):
  runs = {'a': [9.0, 0.001, 0.005, 0.003], 'b': [9.0, 0.010, 0.030, 0.020]}
  steps = FakeSteps(monkeypatch, **runs)
  ms = common.time_interleaved({'a': steps['a'], 'b': steps['b']}, warmup=1, repeats=3)
  assert ms == pytest.approx({'a': 3.0, 'b': 20.0})  # the warm-up's 9 s is not counted
  assert steps.calls == ['a', 'b'] * 4
  steps.script(**runs)
  ms = common.time_interleaved({'a': steps['a'], 'b': steps['b']}, warmup=1, repeats=3,
                               statistic={'b': min})
  assert ms == pytest.approx({'a': 3.0, 'b': 10.0})  # b's fastest run, a's median


def test_paired_ratio_alternates_order_and_takes_per_round_ratios(monkeypatch):
  # Rounds where a load spike slows both peers (round 2) must not move the ratio.
  steps = FakeSteps(monkeypatch, ours=[1.0, 3.0, 1.0, 1.0], peer=[2.0, 6.0, 2.5, 1.0])
  paired = common.paired_ratio(steps['ours'], steps['peer'], rounds=4)
  assert steps.calls == ['ours', 'peer', 'peer', 'ours', 'ours', 'peer', 'peer', 'ours']
  # Ratios 0.5, 0.5, 0.4, 1.0: median 0.5; quartiles by statistics' 'exclusive' method.
  assert paired.median == pytest.approx(0.5)
  assert (paired.low, paired.high) == pytest.approx((0.425, 0.875))
  assert paired.rounds == 4
  assert str(paired) == 'median of 4 paired rounds, IQR 0.43-0.88'
  assert common.PairedRatio.of([0.7]) == common.PairedRatio(0.7, 0.7, 0.7, 1)
  with pytest.raises(ValueError, match='rounds=0'):
    common.paired_ratio(steps['ours'], steps['peer'], rounds=0)


def test_time_in_blocks_rotates_blocks_and_takes_the_median_block(monkeypatch):
  # a's block in round 2 hit a load spike (50-60 ms): one of its three medians, not the result.
  steps = FakeSteps(monkeypatch, a=[9.0, 0.001, 0.003, 0.050, 0.060, 0.002, 0.002],
                    b=[9.0, 0.010, 0.010, 0.020, 0.040, 0.010, 0.012])
  ms = common.time_in_blocks({'a': steps['a'], 'b': steps['b']}, rounds=3, warmup=1,
                             repeats=2)
  assert steps.calls == ['a', 'b'] + ['a', 'a', 'b', 'b'] + ['b', 'b', 'a', 'a'] + [
      'a', 'a', 'b', 'b']
  # Block medians: a 2, 55, 2 ms; b 10, 30, 11 ms. The 9 s warm-up is not counted.
  assert ms == pytest.approx({'a': 2.0, 'b': 11.0})
  with pytest.raises(ValueError, match='rounds=0'):
    common.time_in_blocks({'a': steps['a']}, rounds=0, warmup=0, repeats=1)


def test_pretrain_settings_are_paired_with_their_configs_first_row(monkeypatch):
  """Each later setting is timed in paired rounds against its config's first row, compiled
  again after the setting's own (timed) compile, so that every reported compile ran with no
  other step alive; with one row per config no column is added."""
  built, paired, alive_at_build = [], [], []
  ratio = common.PairedRatio.of([0.8, 0.9, 1.2])

  class FakeRunner:
    def __init__(self, name):
      self.name, self.step = name, common.Compiled(None, 1.0, 2.0, 1e9)
      self.state = common.AttrDict(params={})

  def fake_runner(config, batch_size, pieces=None, overlap_init=False):
    assert not overlap_init  # the CPU tables time each compile alone
    name = f'{config.model.d_model}/{config.train.cpu_backend_optimization_level}'
    alive_at_build.append((name, [r().name for r in built if r() is not None]))
    runner = FakeRunner(name)
    built.append(weakref.ref(runner))
    return runner

  def fake_paired(ours, peer, rounds):
    paired.append((ours.name, peer.name, rounds))
    return ratio

  monkeypatch.setattr(pretrain_step, 'step_runner', fake_runner)
  monkeypatch.setattr(common, 'paired_ratio', fake_paired)
  monkeypatch.setattr(common, 'time_interleaved',
                      lambda fns, **_: {'step': 100.0, 'matmul': 10.0})
  tiny, base = pretrain_step.SETTINGS['tiny'], pretrain_step.SETTINGS['base']
  settings = [tiny, base, pretrain_step.dataclasses.replace(tiny, backend_level=1),
              pretrain_step.dataclasses.replace(base, backend_level=-1)]
  text = pretrain_step.run(quick=True, settings=settings)

  t, b = (f'{pretrain.get_config(v).model.d_model}' for v in ('tiny', 'base'))
  assert alive_at_build == [(f'{t}/-1', []), (f'{b}/1', []),
                            (f'{t}/1', []), (f'{t}/-1', [f'{t}/1']),
                            (f'{b}/-1', []), (f'{b}/1', [f'{b}/-1'])]
  assert paired == [(f'{t}/1', f'{t}/-1', pretrain_step.PAIRED_ROUNDS['tiny']),
                    (f'{b}/-1', f'{b}/1', pretrain_step.PAIRED_ROUNDS['base'])]
  rows = [line for line in text.splitlines() if line.startswith(('| tiny', '| base'))]
  cell = f'{ratio.median:.3f}x (IQR {ratio.low:.2f}-{ratio.high:.2f})'
  assert cell == '0.900x (IQR 0.80-1.20)'
  assert [row.rstrip(' |').rsplit('| ', 1)[-1] for row in rows] == [
      'reference', 'reference', cell, cell]
  one_each = pretrain_step.run(quick=True, settings=[tiny, base])
  assert 'paired' not in one_each and 'reference' not in one_each


def test_compile_with_stats_counts_matmul_flops():
  m, k, n = 64, 48, 32
  compiled = common.compile_with_stats(jax.jit(jnp.matmul), jnp.ones((m, k)), jnp.ones((k, n)))
  assert compiled.flops == 2 * m * k * n
  np.testing.assert_allclose(compiled.fn(jnp.ones((m, k)), jnp.ones((k, n))), k)
  assert compiled.compile_s > 0


def test_target_line_and_table():
  assert common.target_line('x', 0.5, 0.8, at_most=True).endswith('0.50x, met')
  assert 'NOT reached' in common.target_line('x', 0.5, 0.8, at_most=False)
  assert common.markdown_table(('a', 'b'), [(1, 2)]) == '| a | b |\n|---|---|\n| 1 | 2 |'


def test_pipeline_verdict_reads_the_tiny_train_row():
  table = ('| resolution | pipeline | host batch | examples/s | ms/batch | state MB | state '
           'save ms | train step examples/s |\n|---|---|---|---|---|---|---|---|\n'
           '| tiny 96 | pretrain eval | 32 | 500.0 | 64.0 | 1.0 | 3 | 20.0 |\n'
           '| tiny 96 | pretrain train | 32 | 100.0 | 320.0 | 1.0 | 3 | 20.0 |\n')
  assert run_all.pipeline_verdict(table).endswith('5.00x, met')
  assert 'not evaluated' in run_all.pipeline_verdict(table.replace('20.0 |\n', '- |\n'))


def test_run_all_partial_run_appends_and_full_run_replaces(tmp_path, monkeypatch):
  out = tmp_path / 'RESULTS.md'
  out.write_text('# Benchmark results\n\nearlier table\n')

  def fake_run(command):
    name = command[command.index('--section') + 1]
    if name == stop_at:
      raise KeyboardInterrupt  # the run is killed while this section is measured
    return f'## {name} table\n'

  monkeypatch.setattr(run_all, '_run', fake_run)
  stop_at = 'detr'
  monkeypatch.setattr(sys, 'argv', ['run_all.py', '--only', 'matcher,detr', '--out', str(out)])
  with pytest.raises(KeyboardInterrupt):
    run_all.main()
  text = out.read_text()  # the earlier tables and the section measured before the kill
  assert text.startswith('# Benchmark results\n\nearlier table\n\n# Partial benchmark run\n')
  assert '## matcher table' in text and '## detr table' not in text

  stop_at = None
  run_all.main()
  text = out.read_text()
  assert text.count('# Partial benchmark run') == 2 and 'earlier table' in text
  assert text.rindex('## matcher table') < text.rindex('## detr table')

  monkeypatch.setattr(sys, 'argv', ['run_all.py', '--out', str(out)])
  run_all.main()
  text = out.read_text()
  assert text.startswith('# Benchmark results\n') and 'earlier table' not in text
  assert 'Partial' not in text
  assert [line for line in text.splitlines() if line.endswith(' table')] == [
      f'## {name} table' for name in run_all.SECTIONS]


def test_gpu_benchmark_uses_the_task_objective():
  # One definition serves the task and the TensorFlow-free GPU script.
  assert gpu.batch_shapes is pretrain_task.batch_shapes
  assert gpu.pretrain_losses is pretrain_task.pretrain_losses


def test_gpu_losses_mirror_the_task_and_synthetic_batch_obeys_the_contract():
  config = pretrain.get_config('tiny')
  config.loss.det.matcher = 'scipy'  # same answer, no in-graph solver to trace
  batch = pretrain_step.synthetic_batch(config, 4, pretrain_task.batch_shapes, seed=1)
  spec = pretrain_task.batch_shapes(config, 4)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (s.shape, s.dtype) for k, s in spec.items()}
  assert np.all((batch['mlm_labels'] == -1) | (batch['mlm_labels'] == batch['text_ids']))
  assert batch['box_mask'].any(1).all() and (batch['boxes'][..., 2:] > 0).all()
  corners = np.concatenate([batch['boxes'][..., :2] - batch['boxes'][..., 2:] / 2,
                            batch['boxes'][..., :2] + batch['boxes'][..., 2:] / 2], -1)
  assert corners.min() >= 0 and corners.max() <= 1

  m = config.model
  rng = np.random.default_rng(0)
  b, l, t, n, q, d = 4, config.data.max_text_len, config.data.max_caption_len, 36, 20, 3
  outputs = {
      'mlm_logits': rng.normal(size=(b, l, m.vocab_size)),
      'itm_logits': rng.normal(size=(b, 2)),
      'det_class_logits': rng.normal(size=(d, b, q, m.num_classes + 1)),
      'det_attr_logits': rng.normal(size=(d, b, q, m.num_attributes)),
      'det_boxes': rng.uniform(0.1, 0.9, (d, b, q, 4)),
      'caption_logits': rng.normal(size=(b, t, m.vocab_size)),
      'cell_class_logits': rng.normal(size=(b, n, m.num_classes + 1)),
      'visual_mask': np.ones((b, n), bool),
      'cell_centers': rng.uniform(0, 1, (b, n, 2)),
  }
  outputs = {k: jnp.asarray(v, jnp.float32 if v.dtype == np.float64 else v.dtype)
             for k, v in outputs.items()}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  both = jax.jit(lambda o, b: (gpu.pretrain_losses(o, b, config),
                               pretrain_task.pretrain_losses(o, b, config)))
  (total, metrics), (want_total, want_metrics) = both(outputs, batch)
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  assert metrics.keys() == want_metrics.keys()
  for key, value in want_metrics.items():
    np.testing.assert_allclose(metrics[key], value, rtol=1e-6, err_msg=key)


def test_config_stand_in_equals_ml_collections():
  """Without ml_collections (the GPU image) configs/ still builds the same configs."""
  script = ('import sys, json; sys.modules["ml_collections"] = None\n'
            'from bench import common\n'
            'from configs import pretrain\n'
            'from e2e_vlp.models.e2e_vlp import E2EVLP\n'
            'c = pretrain.get_config("base"); assert c.model.get("num_answers", 0) == 0\n'
            'print(json.dumps({v: pretrain.get_config(v).to_dict() for v in ("tiny", "base")}))')
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, capture_output=True,
                       text=True, check=True).stdout
  want = {v: pretrain.get_config(v).to_dict() for v in ('tiny', 'base')}
  assert json.loads(out) == json.loads(json.dumps(want))


def test_hf_detr_backbone_unfrozen_like_ours():
  """HF's filter freezes the whole backbone; after the fix the trainable backbone tensors
  are those our optimizer trains (stages 2-4 convs, stem and stage 1 frozen)."""
  import torch  # pylint: disable=g-import-not-at-top
  from transformers import DetrForObjectDetection  # pylint: disable=g-import-not-at-top
  shape = detr_step.DetrShape('bottleneck', (1, 1, 1, 1), 8, 32, 1, 4, 64, 10, 2, 64, 3)
  model = detr_step.hf_model(shape)
  trainable = {n: p.numel() for n, p in model.model.backbone.named_parameters()
               if p.requires_grad}
  assert trainable and all('stages.0' not in n and 'embedder' not in n for n in trainable)
  fresh = DetrForObjectDetection(model.config)
  assert not any(p.requires_grad for p in fresh.model.backbone.parameters())  # the bug

  config = detr_step.detr_config(shape, detr_step.Variant())
  image = jnp.zeros((1, shape.image, shape.image, 3))
  variables = common.state_lib.strip_boxes(jax.eval_shape(lambda: E2EVLP(config.model).init(
      jax.random.key(0), image, jnp.ones(image.shape[:3], bool), method=E2EVLP.detect)))
  groups = common.optimizer_lib.parameter_groups(
      config.optim, variables['params'])['lr_mult']
  ours = jax.tree.leaves(jax.tree.map(lambda v, mult: v.size if mult else 0,
                                      variables['params']['backbone'], groups['backbone']))
  assert sum(ours) == sum(trainable.values())
  assert isinstance(model, torch.nn.Module)


@pytest.mark.parametrize('shape_name', ['tiny', 'r50'])
def test_conv_ops_lists_the_backbones_3x3_and_stem_convs(shape_name):
  """bench/conv_ops.py times the convolutions the DETR step's backbone has (every distinct
  stem and 3x3 kernel shape), with the strides that shrink its grid to the stage-4 size."""
  shape = detr_step.SHAPES[shape_name]
  config = detr_step.detr_config(shape, detr_step.Variant())
  image = jnp.zeros((1, shape.image, shape.image, 3))
  params = jax.eval_shape(lambda: E2EVLP(config.model).init(
      jax.random.key(0), image, jnp.ones(image.shape[:3], bool), method=E2EVLP.detect)
      )['params']['backbone']
  kernels = {leaf.shape for leaf in jax.tree.leaves(params) if leaf.ndim == 4
             and leaf.shape[0] > 1}
  convs = conv_ops.SHAPES[shape_name]
  assert {(c.kernel, c.kernel, c.cin, c.cout) for c in convs} == kernels
  assert all(c.batch == shape.batch for c in convs) and convs[0].size == shape.image
  last = convs[-1]
  assert last.size == shape.image // 32 and last.stride == 1 and last.trained
  assert [c.trained for c in convs[:3]] == [False, False, True]  # stem, stage 1 frozen


def test_conv_ops_rows_agree_with_pytorch():
  """Each op's row: XLA's and YNNPACK's result within float32 rounding of PyTorch's (the
  timings compare the same work); a frozen conv times its forward pass only."""
  trained = conv_ops.time_conv(conv_ops.Conv('t', 12, 20, 24, stride=2), repeats=1, warmup=0)
  frozen = conv_ops.time_conv(conv_ops.Conv('f', 12, 20, 24, trained=False), repeats=1,
                              warmup=0)
  assert [r[2] for r in trained] == list(conv_ops.OPS) and [r[2] for r in frozen] == [
      'forward']
  for row in trained + frozen:
    assert float(row[-1]) < 1e-5
    assert all(float(cell) > 0 for cell in row[3:6])


def test_gpu_script_smoke_run_without_tensorflow_or_ml_collections():
  """The GPU image's conditions: neither package importable, one device."""
  script = ('import runpy, sys\n'
            'for name in ("tensorflow", "tensorflow_datasets", "ml_collections", "clu"):\n'
            '  sys.modules[name] = None\n'
            'sys.argv = ["bench/gpu.py", "--smoke"]\n'
            'runpy.run_path("bench/gpu.py", run_name="__main__")')
  env = dict(os.environ, XLA_FLAGS=fast_compile.FLAGS, JAX_PLATFORMS='cpu')  # one device
  out = subprocess.run([sys.executable, '-c', script], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [[c.strip() for c in line.strip('|').split('|')] for line in out.stdout.splitlines()
          if line.startswith('| smoke |') or line.startswith('| tiny (')]
  names = [r[1] for r in rows if r[0] == 'smoke']
  assert names == ['HF DETR (PyTorch float32)', 'HF DETR (PyTorch bf16 autocast)',
                   'ours bfloat16, hungarian']
  ratios = [float(r[4].rstrip('x')) for r in rows if r[0] == 'smoke']
  assert min(ratios[:2]) == pytest.approx(1.0) and ratios[2] > 0  # vs the fastest HF row
  (pretrain_row,) = [r for r in rows if r[0] != 'smoke']
  assert float(pretrain_row[6]) > 0 and 0 < float(pretrain_row[9]) < 10  # GFLOP, fraction


def test_caption_ceiling_is_the_bayes_accuracy_of_a_known_distribution():
  from bench import caption_ceiling
  # 'a b' three times, 'a c' once: the best guesses are a, then b, then [EOS]; only the
  # c of 'a c' is missed: 11 of 12 tokens.
  eos = caption_ceiling.EOS
  caps = [['a', 'b', eos]] * 3 + [['a', 'c', eos]]
  assert caption_ceiling.best_guess_hits(caps, caps) == (11, 12)
  # Held out: fit on 'a c' only -> on three 'a b' only the a is right (c guessed for b,
  # and the prefix 'a b' was never seen): 3 of 9.
  assert caption_ceiling.best_guess_hits(caps[3:], caps[:3]) == (3, 9)
  # A prefix never seen while fitting is a miss.
  assert caption_ceiling.best_guess_hits([['x', eos]], [['a', eos]]) == (0, 2)


def test_gpu_run_rejects_unknown_sections_and_rows_before_measuring_anything():
  emitted = []
  with pytest.raises(ValueError, match='Unknown pre-training rows'):
    gpu.run(gpu.FULL, emitted.append, ('pretrain',), ('huge',))
  with pytest.raises(ValueError, match='Unknown sections'):
    gpu.run(gpu.FULL, emitted.append, ('detr', 'speed'))
  assert emitted == []
