"""Pure loss functions `(predictions, batch) -> (loss, metrics)` and their helpers."""

from e2e_vlp.losses import boxes
from e2e_vlp.losses import detection
from e2e_vlp.losses import matching
from e2e_vlp.losses import text
from e2e_vlp.losses.detection import cell_class_loss
from e2e_vlp.losses.detection import set_prediction_loss
from e2e_vlp.losses.matching import detr_cost
from e2e_vlp.losses.matching import match
from e2e_vlp.losses.text import caption_loss
from e2e_vlp.losses.text import itm_loss
from e2e_vlp.losses.text import mlm_loss

__all__ = [
    'boxes', 'caption_loss', 'cell_class_loss', 'detection', 'detr_cost', 'itm_loss',
    'match', 'matching', 'mlm_loss', 'set_prediction_loss', 'text',
]
