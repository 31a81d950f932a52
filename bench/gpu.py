"""GPU benchmark (one GPU, bfloat16): the DETR step table and the pre-training step table.

Table 1: this project's DETR step (`E2EVLP.detect` + set loss, bf16 compute) against
Hugging Face `DetrForObjectDetection` in PyTorch on the same GPU (float32 and bf16
autocast) at the `tiny` and `r50` shapes of bench/detr_step.py.
Table 2: the full pre-training step at `tiny` and `base` (bf16 compute) with XLA's flop
count as a fraction of a bf16 8192^3 matmul measured in the same run.

The GPU image has jax (CUDA), flax, optax, orbax, torch and transformers but neither
TensorFlow nor ml_collections. So this script imports no e2e_vlp.data and no task module
(TensorFlow): `batch_shapes` and `pretrain_losses` come from the TF-free
e2e_vlp.tasks.pretrain_objective, and bench.common stands in for ml_collections.

Usage: bash bench/gpu.sh [--sections detr,pretrain] [--pretrain tiny,base] (on the GPU
       machine; mostly compilation: on an H200 the DETR section took 7 minutes with two
       variants per shape, now one, the tiny pre-training row under 4, and the base row
       alone had printed nothing after 290 s; see bench/GPU_RESULTS.md), or
       python bench/gpu.py --smoke (tiny sizes, any backend: a functional check;
       tests/test_bench.py runs it with TensorFlow and ml_collections made unimportable).
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# JAX and PyTorch share the GPU: JAX must not grab 75% of its memory up front.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

from bench import common  # noqa: E402  (first: provides ml_collections where missing)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench import detr_step  # noqa: E402
from bench import pretrain_step  # noqa: E402
from e2e_vlp.tasks.pretrain_objective import batch_shapes, pretrain_losses  # noqa: E402

# ---- what runs ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  detr_shapes: dict[str, detr_step.DetrShape]
  detr_variants: list[detr_step.Variant]
  pretrain_settings: list[pretrain_step.Setting]
  repeats: int
  matmul_n: int


BF16 = 'bfloat16'
FULL = Plan(
    detr_shapes={k: detr_step.SHAPES[k] for k in ('tiny', 'r50')},
    # The in-graph matcher only: a host callback stalls the GPU (the scipy rows on CPU
    # show its cost without the stall). One variant per shape: on the H200 the 1x1 convs
    # as matrix products (`base`'s choice, made for XLA:CPU) and as cuDNN convolutions
    # were within 15% of each other (bench/GPU_RESULTS.md), and each variant costs a
    # minute or more of compilation.
    detr_variants=[detr_step.Variant(dtype=BF16)],
    # base at DETR's 800 canvas, 8 images per GPU (DETR: 4 per V100).
    pretrain_settings=[pretrain_step.Setting('tiny', 96, 32, dtype=BF16),
                       pretrain_step.Setting('base', 800, 8, dtype=BF16)],
    repeats=10, matmul_n=8192)
_SMOKE_MODEL = (('model.d_model', 32), ('model.num_heads', 4), ('model.mlp_dim', 64),
                ('model.encoder_layers', 1), ('model.decoder_layers', 1),
                ('model.caption_decoder_layers', 1), ('model.fusion_layers', 1),
                ('model.num_queries', 6),
                ('model.backbone.width', 8), ('data.max_boxes', 3),
                ('data.max_text_len', 10), ('data.max_caption_len', 10))
SMOKE = Plan(
    detr_shapes={'smoke': detr_step.DetrShape('basic', (1, 1, 1, 1), 8, 32, 1, 4, 64, 10, 2,
                                              64, 3)},
    detr_variants=[detr_step.Variant(dtype=BF16)],
    pretrain_settings=[pretrain_step.Setting('tiny', 32, 4, dtype=BF16,
                                             overrides=_SMOKE_MODEL)],
    repeats=2, matmul_n=256)


def hf_peers(device: str) -> detr_step.HfPeers:
  """HF DETR steps in float32 and in bf16 autocast, synchronised on the GPU."""
  import torch  # noqa: PLC0415

  def synced(step):
    def run():
      step()
      if device == 'cuda':
        torch.cuda.synchronize()
    return run

  return {
      'HF DETR (PyTorch float32)': lambda model, batch: synced(
          detr_step.hf_step(model, batch, device=device)),
      'HF DETR (PyTorch bf16 autocast)': lambda model, batch: synced(
          detr_step.hf_step(model, batch, device=device, autocast_dtype=torch.bfloat16)),
  }


def precision_line(device: str) -> str:
  """Which float32 matrix arithmetic each framework uses (TF32 changes the peers' work)."""
  import torch  # noqa: PLC0415
  jax_precision = (getattr(jax.config, 'jax_default_matmul_precision', None)
                   or 'default (TF32 allowed on GPU)')
  if device != 'cuda':
    return f'- float32 matmul precision: JAX {jax_precision}; PyTorch on CPU'
  return (f'- float32 matmul precision: JAX {jax_precision}; PyTorch matmul TF32 '
          f'{torch.backends.cuda.matmul.allow_tf32}, cuDNN TF32 {torch.backends.cudnn.allow_tf32}')


SECTIONS = ('detr', 'pretrain')
# The GPU run must fit its machine's time limit. On the H200 (bench/GPU_RESULTS.md, first
# lease) the DETR sections spent ~25 s (tiny) and ~70 s (r50) per runner beyond the step's
# compilation and timing, most likely the state's jitted initialisation (not profiled
# there; on CPU it takes ~40% of a runner's build), so each runner overlaps the two.
OVERLAP_NOTE = ('Each step compiled while its state initialised (as train/loop.py does), so '
                'the compile columns include the initialisation\'s share.')


def run(plan: Plan, emit: Callable[[str], None], sections: tuple[str, ...] = SECTIONS,
        pretrain_variants: tuple[str, ...] = ()) -> None:
  """Measures the `sections` of `plan` (pre-training rows only of `pretrain_variants`, all
  when empty), handing each finished table to `emit` (a long run that is cut off keeps
  what it measured)."""
  unknown = set(sections) - set(SECTIONS)
  if unknown:
    raise ValueError(f'Unknown sections {sorted(unknown)}; choose from {SECTIONS}.')
  planned = [s.variant for s in plan.pretrain_settings]
  unknown_rows = set(pretrain_variants) - set(planned)
  if unknown_rows:
    raise ValueError(f'Unknown pre-training rows {sorted(unknown_rows)}; choose from {planned}.')
  import torch  # noqa: PLC0415
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  start = time.perf_counter()
  gpu_name = torch.cuda.get_device_name() if device == 'cuda' else 'none (CPU run)'
  emit('\n'.join(['# GPU benchmark', ''] + common.machine_lines() +
                  [f'- GPU: {gpu_name}; PyTorch {torch.__version__} on {device}',
                   precision_line(device),
                   f'- XLA_FLAGS: {os.environ.get("XLA_FLAGS") or "(none: XLA defaults)"}']))
  for shape_name, shape in (plan.detr_shapes.items() if 'detr' in sections else ()):
    shape_start = time.perf_counter()
    rows, verdicts = detr_step.compare(
        {shape_name: shape}, {shape_name: plan.detr_variants}, hf_peers(device),
        {shape_name: plan.repeats}, {shape_name: plan.repeats}, overlap_init=True)
    emit('\n'.join(
        [f'## DETR training step at {shape_name}: ours (bf16) vs Hugging Face DETR, same '
         'device', '', common.markdown_table(detr_step.HEADERS, rows), '',
         f'Shape: {shape}. Ratios against the fastest HF row; medians of {plan.repeats} '
         'interleaved steps after one warm-up step. ' + OVERLAP_NOTE, ''] + verdicts +
        [f'({shape_name}: {time.perf_counter() - shape_start:.0f} s)']))
  for setting in (plan.pretrain_settings if 'pretrain' in sections else ()):
    if pretrain_variants and setting.variant not in pretrain_variants:
      continue
    emit(pretrain_step.run(
        repeats=plan.repeats, pieces=(batch_shapes, pretrain_losses), matmul_n=plan.matmul_n,
        matmul_dtype=jnp.bfloat16, settings=[setting],
        title=f'Pre-training step at {setting.variant} (bf16) vs the bf16 {plan.matmul_n}^3 '
              'matmul peak', overlap_init=True) + '\n\n' + OVERLAP_NOTE)
  emit(f'Total {time.perf_counter() - start:.0f} s.')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes on any backend: checks that everything runs')
  parser.add_argument('--out', default='', help='also write the Markdown here')
  parser.add_argument('--sections', default=','.join(SECTIONS),
                      help=f'comma-separated, from {",".join(SECTIONS)}')
  parser.add_argument('--pretrain', default='',
                      help='comma-separated pre-training rows (tiny,base); default all')
  args = parser.parse_args()
  if not args.smoke and jax.default_backend() != 'gpu':
    raise SystemExit(f'No GPU: JAX backend is {jax.default_backend()!r}. Run on the GPU '
                     'machine, or pass --smoke for a functional check at tiny sizes.')
  if args.out:
    open(args.out, 'w').close()

  def emit(section: str) -> None:
    print(section + '\n', flush=True)
    if args.out:
      with open(args.out, 'a') as f:
        f.write(section + '\n\n')

  run(SMOKE if args.smoke else FULL, emit, tuple(args.sections.split(',')),
      tuple(v for v in args.pretrain.split(',') if v))


if __name__ == '__main__':
  main()
