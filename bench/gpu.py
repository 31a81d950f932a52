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

Usage: bash bench/gpu.sh (on the GPU machine, e.g. the device tool's `run` with
       timeout_s=540; about 5-7 minutes, mostly compilation), or
       python bench/gpu.py --smoke (tiny sizes, any backend: a functional check;
       tests/test_bench.py runs it with TensorFlow and ml_collections made unimportable).
"""

import argparse
import dataclasses
import os
import sys
import time

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
    # show its cost without the stall). Two compiles per shape keep the run in minutes.
    detr_variants=[detr_step.Variant(dtype=BF16),
                   detr_step.Variant(dtype=BF16, frozen_grads=True)],
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


def run(plan: Plan) -> str:
  import torch  # noqa: PLC0415
  device = 'cuda' if jax.default_backend() == 'gpu' and torch.cuda.is_available() else 'cpu'
  start = time.perf_counter()
  rows, verdicts = detr_step.compare(
      plan.detr_shapes, {k: plan.detr_variants for k in plan.detr_shapes}, hf_peers(device),
      {k: plan.repeats for k in plan.detr_shapes})
  detr_s = time.perf_counter() - start
  table2 = pretrain_step.run(
      repeats=plan.repeats, pieces=(batch_shapes, pretrain_losses), matmul_n=plan.matmul_n,
      matmul_dtype=jnp.bfloat16, settings=plan.pretrain_settings,
      title=f'Pre-training step (bf16) vs the bf16 {plan.matmul_n}^3 matmul peak')
  gpu_name = torch.cuda.get_device_name() if device == 'cuda' else 'none (CPU run)'
  return '\n'.join(
      ['# GPU benchmark', ''] + common.machine_lines() +
      [f'- GPU: {gpu_name}; PyTorch {torch.__version__} on {device}', '',
       '## DETR training step: ours (bf16) vs Hugging Face DETR, same device', '',
       common.markdown_table(detr_step.HEADERS, rows), '',
       'Ratios against the fastest HF row; medians after one warm-up step.', ''] + verdicts +
      ['', f'(table 1 took {detr_s:.0f} s)', '', table2,
       f'\nTotal {time.perf_counter() - start:.0f} s.'])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--smoke', action='store_true',
                      help='tiny sizes on any backend: checks that everything runs')
  parser.add_argument('--out', default='', help='also write the Markdown here')
  args = parser.parse_args()
  if not args.smoke and jax.default_backend() != 'gpu':
    raise SystemExit(f'No GPU: JAX backend is {jax.default_backend()!r}. Run on the GPU '
                     'machine, or pass --smoke for a functional check at tiny sizes.')
  text = run(SMOKE if args.smoke else FULL)
  print(text)
  if args.out:
    with open(args.out, 'w') as f:
      f.write(text + '\n')


if __name__ == '__main__':
  main()
