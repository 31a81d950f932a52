"""VQA fine-tuning: learning rate paired with warm-up length (3 runs), for configs/vqa.py.

  python launch/sweep.py --config configs/vqa.py:tiny \
      --sweep configs/sweeps/vqa_lr.py --workdir workdirs/vqa_lr \
      --base_override init_from=workdirs/pretrain_tiny
"""

from e2e_vlp.sweep import axis, zip_


def get_sweep() -> list[dict]:
  # BERT-style fine-tuning rates; a larger rate gets a longer warm-up (assumed).
  return zip_(axis('optim.lr', [2e-5, 5e-5, 1e-4]),
              axis('optim.warmup_steps', [100, 200, 400]))
