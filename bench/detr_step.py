"""Benchmark: one DETR training step of this project's model against Hugging Face DETR.

Our side is `E2EVLP.detect` + `set_prediction_loss` (no text) trained by the project's
step (`e2e_vlp.train`: AdamW, clip 0.1, backbone at 0.1x, stem and stage 1 frozen). The
peer is `transformers.DetrForObjectDetection` with random weights at the same shapes,
batch (random boxes), auxiliary losses, AdamW, clip and frozen set, in PyTorch with
`torch.set_num_threads` = the host's cores (2 here); at a load over twice the cores with
OMP_WAIT_POLICY=PASSIVE (see below), which the table states. In transformers 5.x a non-timm ResNet
backbone ends up entirely frozen (its filter looks for "stage.1", the parameters are named
"stages.1"); we unfreeze stages 1-3, as original DETR trains them.

Shapes: `tiny` (ResNet basic blocks [1,1,1,1], widths 32-256, d_model 128, 2+2 layers,
4 heads, FFN 512, 50 queries, batch 8 at 256x256) and `r50` (ResNet-50, d_model 256, 6+6
layers, 8 heads, FFN 2048, 100 queries, batch 2 at 512x512); 10 boxes per image.

Variants of ours: matcher 'hungarian' (in-graph) or 'scipy' (host callback)
(`config.loss.det.matcher`), compute dtype float32 or bfloat16 (`config.model.dtype`),
the stem as XLA's convolution and max-pool (the `base` config's) or in the forms XLA runs
faster on CPU ('CPU stem': `config.model.backbone.stem_conv='row_fold'`,
`max_pool='unrolled'`; the stem is frozen here, so only its forward pass counts), and the
1x1 convs as matrix products (`pointwise_conv='dot'`, the `base` config's) or as XLA
convolutions ('1x1 as conv', to show what 'dot' saves), and which operations XLA:CPU hands to
YNNPACK (`config.train.cpu_ynn_fusion_types`; each shape takes the setting of the config
whose backbone it resembles, `DetrShape.cpu_ynn_fusion_types`: today both configs' dots and
reductions; the other rows name theirs, 'YNNPACK off' none),
and the backbone's ReLU outputs
made to be stored once (`relu='materialized'`, the `base` config's) or left to XLA to
recompute inside the kernel gradients' transposes ('ReLU plain'), and the AdamW update
in the form XLA:CPU runs in place (`optim.fused_update`, the `base` config's) or as the
optax chain ('optax chain AdamW').
The project's step skips the frozen parameters' backward pass (`make_train_step(frozen=)`,
like PyTorch's requires_grad=False); the 'frozen grads computed' variant passes no mask,
as the step did before, to show what that saves.

Usage: python bench/detr_step.py [--quick] [--repeats N] [--shapes tiny,r50]
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# On a busy host libgomp's spinning workers turn each PyTorch parallel region into a wait
# for a descheduled thread: measured here under load ~10, 2 threads ran a step 6-15x slower
# than 1 thread. Passive waiting removes that; libgomp reads it when torch loads. At load
# 0.8-1.9 on 2 cores it cost HF instead (tiny ~193 vs ~158 ms, r50 2070-2085 vs 1790-1900
# ms, 2026-12-06), flattering our ratio, hence only above twice the cores.
if os.getloadavg()[0] > 2 * (os.cpu_count() or 1):
  os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

from bench import common  # noqa: E402  (first: provides ml_collections where missing)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import pretrain  # noqa: E402
from e2e_vlp.losses import detection  # noqa: E402
from e2e_vlp.models.e2e_vlp import E2EVLP  # noqa: E402
from e2e_vlp.models.e2e_vlp import init_inputs  # noqa: E402

NUM_CLASSES = 91  # COCO's label space, as in DETR and HF's default head


@dataclasses.dataclass(frozen=True)
class DetrShape:
  block: str  # 'basic' | 'bottleneck'
  stage_sizes: tuple[int, ...]
  width: int  # channels of the stem and stage 1 (before the bottleneck expansion)
  d_model: int
  layers: int  # encoder layers = decoder layers
  heads: int
  ffn: int
  queries: int
  batch: int
  image: int  # square side in pixels
  boxes: int  # real boxes per image
  # The pre-training config whose backbone this shape resembles; the step takes its
  # train.cpu_ynn_fusion_types (the same in both configs today; they differed while
  # YNNPACK's convolutions looked faster at ResNet-50's widths, README).
  like_config: str = 'base'

  @property
  def cpu_ynn_fusion_types(self) -> str:
    return pretrain.get_config(self.like_config).train.cpu_ynn_fusion_types

  @property
  def hidden_sizes(self) -> list[int]:
    expansion = 4 if self.block == 'bottleneck' else 1
    return [self.width * 2 ** i * expansion for i in range(len(self.stage_sizes))]


SHAPES = {
    'tiny': DetrShape('basic', (1, 1, 1, 1), 32, 128, 2, 4, 512, 50, 8, 256, 10,
                      like_config='tiny'),
    'r50': DetrShape('bottleneck', (3, 4, 6, 3), 64, 256, 6, 8, 2048, 100, 2, 512, 10),
}
# DETR: stem and stage 1 frozen; HF's backbone after unfreezing stages 1-3 matches.
FROZEN = (r'backbone/(conv1|layer1_\d+)/.*',)
# Issue targets: our step time / HF's.
TARGETS = {'tiny': 0.8, 'r50': 1.0}
# Untimed rounds before the medians. PyTorch's step settles slowly (its allocator and
# oneDNN caches): at tiny, HF's first 12 steps took 331, 229, 192, ... 159 ms, then held
# 150-165; at r50, 3.3, 2.4 s, then 1.7-1.9 s. Ours is steady from its second step. One
# warm-up round left slow HF steps in the medians, flattering our ratio. Other shapes
# (bench/gpu.py's smoke test): one round.
WARMUP = {'tiny': 10, 'r50': 3}
# Rounds of the config's step against HF alone, after the table's rounds, for the target
# lines: the median of per-round ratios (`common.paired_ratio`). The table's medians come
# from 3 (tiny) and 2 (r50) rounds in a quick run, too few for a ratio that moved by 5-10%
# between runs of unchanged code. At r50, 6 paired rounds left an IQR of 0.88-1.05 in one
# quick run (2026-12-07 17:16): 10 take about 16 s more.
PAIRED_ROUNDS = {'tiny': 20, 'r50': 10}
# The YNNPACK settings compared (each shape's own, the other config's, none) and their
# names in the table.
YNN_SETTINGS = {'individual_dot,individual_convolution,reduce': 'dots, convs and reductions',
                'individual_dot,reduce': 'dots and reductions', '': 'off'}


@dataclasses.dataclass(frozen=True)
class Variant:
  dtype: str = 'float32'
  matcher: str = 'hungarian'
  frozen_grads: bool = False  # True: no frozen mask, their gradients computed
  cpu_stem: bool = False  # True: the backbone stem in common.STEM_FORMS['cpu']
  pointwise_conv: str = ''  # config.model.backbone.pointwise_conv; '' keeps the config's
  # config.train.cpu_ynn_fusion_types ('' none); None keeps the shape's.
  ynn_fusion_types: str | None = None
  relu: str = ''  # config.model.backbone.relu; '' keeps the config's
  fused_update: bool | None = None  # config.optim.fused_update; None keeps the config's

  @property
  def name(self) -> str:
    extra = ', frozen grads computed' if self.frozen_grads else ''
    extra += ', CPU stem' if self.cpu_stem else ''
    extra += f', 1x1 as {self.pointwise_conv}' if self.pointwise_conv else ''
    if self.ynn_fusion_types is not None:
      extra += f', YNNPACK {YNN_SETTINGS.get(self.ynn_fusion_types, self.ynn_fusion_types)}'
    extra += f', ReLU {self.relu}' if self.relu else ''
    if self.fused_update is not None:
      extra += ', fused AdamW' if self.fused_update else ', optax chain AdamW'
    return f'ours {self.dtype}, {self.matcher}{extra}'


def detr_config(shape: DetrShape, variant: Variant) -> Any:
  """The pre-training config (`base`) reshaped into DETR at `shape`: detection only."""
  config = pretrain.get_config('base')
  m = config.model
  m.backbone.update(block=shape.block, stage_sizes=shape.stage_sizes, width=shape.width,
                    norm='frozen_bn', stem='imagenet', dilation=False)
  if variant.cpu_stem:
    m.backbone.update(common.STEM_FORMS['cpu'])
  if variant.pointwise_conv:
    m.backbone.pointwise_conv = variant.pointwise_conv
  if variant.relu:
    m.backbone.relu = variant.relu
  m.update(dtype=variant.dtype, d_model=shape.d_model, num_heads=shape.heads,
           mlp_dim=shape.ffn, encoder_layers=shape.layers, decoder_layers=shape.layers,
           num_queries=shape.queries, num_classes=NUM_CLASSES, num_attributes=1,
           dropout=0.1, attention_dropout=0.0,  # HF DetrConfig defaults
           reference_points=False, cell_class_head=False)
  config.loss.det.update(aux_loss=True, matcher=variant.matcher)
  config.train.cpu_ynn_fusion_types = (shape.cpu_ynn_fusion_types
                                       if variant.ynn_fusion_types is None
                                       else variant.ynn_fusion_types)
  config.optim.update(lr=1e-4, weight_decay=1e-4, clip_norm=0.1, warmup_steps=0,
                      schedule='constant', lr_mults=(('backbone/.*', 0.1),), frozen=FROZEN)
  if variant.fused_update is not None:
    config.optim.fused_update = variant.fused_update
  return config


def random_batch(shape: DetrShape, seed: int = 0) -> dict[str, np.ndarray]:
  """Normalised-looking pixels and `shape.boxes` random cxcywh boxes per image."""
  rng = np.random.default_rng(seed)
  b, s, m = shape.batch, shape.image, shape.boxes
  centres = rng.uniform(0.2, 0.8, (b, m, 2))
  sizes = rng.uniform(0.05, 0.4, (b, m, 2))
  return {
      'image': rng.normal(size=(b, s, s, 3)).astype(np.float32),
      'image_mask': np.ones((b, s, s), bool),
      'boxes': np.concatenate([centres, sizes], -1).astype(np.float32),
      'labels': rng.integers(0, NUM_CLASSES, (b, m)).astype(np.int32),
      'box_mask': np.ones((b, m), bool),
  }


def ours_runner(shape: DetrShape, variant: Variant, batch: dict[str, np.ndarray], *,
                overlap_init: bool = False) -> common.StepRunner:
  config = detr_config(shape, variant)
  model = E2EVLP(config.model)

  def init_variables(rng):
    inputs = init_inputs(config.model, {k: batch[k][:1] for k in ('image', 'image_mask')})
    return model.init({'params': rng, 'dropout': rng}, inputs['image'], inputs['image_mask'],
                      train=False, method=E2EVLP.detect)

  def loss_fn(params, constants, batch, rng):
    outputs = model.apply({'params': params, **constants}, batch['image'], batch['image_mask'],
                          train=True, rngs={'dropout': rng}, method=E2EVLP.detect)
    return detection.set_prediction_loss(outputs, batch, config.loss.det)

  return common.make_step_runner(config, init_variables, loss_fn, batch,
                                 frozen_grads=variant.frozen_grads, overlap_init=overlap_init)


def param_count(tree: Any) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# ---- the peer: Hugging Face DETR in PyTorch -----------------------------------------


def hf_model(shape: DetrShape) -> Any:
  """`DetrForObjectDetection` with random weights at `shape`, stages 1-3 trainable."""
  from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig  # noqa: PLC0415
  backbone = ResNetConfig(embedding_size=shape.width, hidden_sizes=shape.hidden_sizes,
                          depths=list(shape.stage_sizes), layer_type=shape.block,
                          out_features=[f'stage{len(shape.stage_sizes)}'])
  config = DetrConfig(
      use_timm_backbone=False, backbone_config=backbone, use_pretrained_backbone=False,
      num_labels=NUM_CLASSES, d_model=shape.d_model, encoder_layers=shape.layers,
      decoder_layers=shape.layers, encoder_attention_heads=shape.heads,
      decoder_attention_heads=shape.heads, encoder_ffn_dim=shape.ffn,
      decoder_ffn_dim=shape.ffn, num_queries=shape.queries, auxiliary_loss=True)
  model = DetrForObjectDetection(config)
  unfreeze_detr_backbone(model)
  return model


def unfreeze_detr_backbone(model: Any) -> int:
  """Makes backbone stages 1-3 trainable (original DETR); returns how many tensors."""
  count = 0
  for name, param in model.model.backbone.named_parameters():
    if any(f'stages.{i}.' in name for i in (1, 2, 3)):
      param.requires_grad_(True)
      count += 1
  if not count:
    raise RuntimeError('Found no HF backbone parameters named "stages.N."; the '
                       'transformers naming changed: update unfreeze_detr_backbone.')
  return count


def hf_step(model: Any, batch: dict[str, np.ndarray], *, device: str = 'cpu',
            autocast_dtype: Any = None) -> Callable[[], Any]:
  """One AdamW training step of `model` on `batch` (DETR's groups, clip 0.1)."""
  import torch  # noqa: PLC0415
  model.to(device).train()
  pixels = torch.from_numpy(batch['image']).permute(0, 3, 1, 2).contiguous().to(device)
  pixel_mask = torch.from_numpy(batch['image_mask']).long().to(device)
  labels = [{'class_labels': torch.from_numpy(l.astype(np.int64)).to(device),
             'boxes': torch.from_numpy(b).to(device)}
            for l, b in zip(batch['labels'], batch['boxes'])]
  trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
  groups = [{'params': [p for n, p in trainable if 'backbone' not in n], 'lr': 1e-4},
            {'params': [p for n, p in trainable if 'backbone' in n], 'lr': 1e-5}]
  optimizer = torch.optim.AdamW(groups, lr=1e-4, weight_decay=1e-4)
  params = [p for _, p in trainable]

  def step():
    with torch.autocast(device_type=device, dtype=autocast_dtype,
                        enabled=autocast_dtype is not None):
      loss = model(pixel_values=pixels, pixel_mask=pixel_mask, labels=labels).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 0.1)
    optimizer.step()
    return loss

  return step


def hf_param_count(model: Any) -> int:
  return sum(p.numel() for p in model.parameters())


# ---- the table ------------------------------------------------------------------------

HfPeers = dict[str, Callable[[Any, dict[str, np.ndarray]], Callable[[], Any]]]


def variants_for(shape_name: str, quick: bool) -> list[Variant]:
  default, computed = Variant(), Variant(frozen_grads=True)
  own = SHAPES[shape_name].cpu_ynn_fusion_types
  forms = [Variant(cpu_stem=True), Variant(pointwise_conv='conv'),
           *[Variant(ynn_fusion_types=kinds) for kinds in YNN_SETTINGS if kinds != own],
           Variant(relu='plain'), Variant(fused_update=False)]
  if quick:
    return [default, computed] + forms
  return [default, computed] + forms + [Variant(matcher='scipy'), Variant(dtype='bfloat16')]


def compare(shapes: dict[str, DetrShape], variants: dict[str, list[Variant]],
            hf_peers: HfPeers, repeats: dict[str, int], paired_rounds: dict[str, int], *,
            overlap_init: bool = False) -> tuple[list[tuple], list[str]]:
  """Table rows and target lines; every ratio is against the fastest HF peer. The
  default config's target line comes from `paired_rounds` more rounds of it against that
  peer alone (when the shape has a target and the default is among `variants`).
  `overlap_init`: see `common.make_step_runner`."""
  rows, verdicts = [], []
  for shape_name, shape in shapes.items():
    batch = random_batch(shape)
    common.progress(f'DETR {shape_name}: building the Hugging Face model')
    hf = hf_model(shape)
    fns = {name: make(hf, batch) for name, make in hf_peers.items()}
    runners = {}
    for variant in variants[shape_name]:
      common.progress(f'DETR {shape_name}: building ours, {variant.name}')
      runners[variant.name] = ours_runner(shape, variant, batch, overlap_init=overlap_init)
      fns[variant.name] = runners[variant.name]
    common.progress(f'DETR {shape_name}: timing {len(fns)} steps')
    ms = common.time_interleaved(fns, warmup=WARMUP.get(shape_name, 1),
                                 repeats=repeats[shape_name])
    hf_name = min(hf_peers, key=ms.get)
    hf_ms = ms[hf_name]
    ours_params = param_count(next(iter(runners.values())).state.params)
    for name, value in ms.items():
      runner = runners.get(name)
      compile_s = (f'{runner.step.compile_s:.0f} / {runner.step.compile_cpu_s:.0f}' if runner
                   else '-')
      params = ours_params if runner else hf_param_count(hf)
      rows.append((shape_name, name, f'{params / 1e6:.2f}', f'{value:.0f}',
                   f'{value / hf_ms:.2f}x', compile_s))
    target = TARGETS.get(shape_name)
    if target is None:
      continue
    default = Variant().name
    if default in runners:
      paired = common.paired_ratio(runners[default], fns[hf_name],
                                   rounds=paired_rounds[shape_name])
      verdicts.append(common.target_line(
          f'{shape_name} step ours/HF (default config: {default}; {paired})',
          paired.median, target, at_most=True))
    best_name = min(runners, key=ms.get)
    verdicts.append(common.target_line(
        f'{shape_name} step ours/HF (fastest row of the table: {best_name})',
        ms[best_name] / hf_ms, target, at_most=True))
  return rows, verdicts


HEADERS = ('shape', 'implementation', 'params M', 'ms/step (median)', 'vs HF',
           'compile s (wall / CPU)')


def run(quick: bool = False, repeats: int | None = None,
        shapes: tuple[str, ...] = ('tiny', 'r50')) -> str:
  """Markdown section: ms per step of every variant and of HF, and their ratios."""
  import torch  # noqa: PLC0415
  load = common.host_load()
  threads = os.cpu_count() or 1
  torch.set_num_threads(threads)
  default_reps = {'tiny': 3 if quick else 10, 'r50': 2 if quick else 3}
  rows, verdicts = compare(
      {k: SHAPES[k] for k in shapes}, {k: variants_for(k, quick) for k in shapes},
      {'HF DETR (PyTorch float32)': hf_step}, {k: repeats or default_reps[k] for k in shapes},
      {k: PAIRED_ROUNDS[k] for k in shapes})
  return '\n'.join([
      '## DETR training step: ours vs Hugging Face DetrForObjectDetection (PyTorch)', '',
      common.load_note(load), '', common.markdown_table(HEADERS, rows), '',
      f'Shapes: {"; ".join(f"{k}: {SHAPES[k]}" for k in shapes)}.',
      f'Peers interleaved, medians after {", ".join(f"{WARMUP.get(k, 1)} ({k})" for k in shapes)} '
      f'warm-up rounds. PyTorch: {threads} threads, '
      f'OMP_WAIT_POLICY={os.environ.get("OMP_WAIT_POLICY", "unset")} (see the module doc). '
      'Each default-config target line: after the table, '
      f'{", ".join(f"{PAIRED_ROUNDS[k]} ({k})" for k in shapes)} more rounds of that row '
      'and HF alone, alternating which runs first; the median of the per-round ratios.',
      ''] + verdicts)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='fewer variants and repeats')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--shapes', default='tiny,r50', help='comma-separated: tiny,r50')
  args = parser.parse_args()
  print(run(args.quick, args.repeats, tuple(args.shapes.split(','))))


if __name__ == '__main__':
  main()
