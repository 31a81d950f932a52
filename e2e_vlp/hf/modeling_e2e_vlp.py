"""PyTorch mirror of the JAX E2E-VLP model (e2e_vlp/models), for Hugging Face.

Same computation, same parameter layout (torch conventions: Linear [out, in], Conv2d
OIHW), so `e2e_vlp.hf.convert` maps the JAX checkpoint onto it one tensor at a time.
Names follow torchvision ResNet (`backbone.layer1.0.conv1`), HF BERT (`embeddings`,
`encoder.layer.N.attention.self.query`, `pooler`) and DETR (`decoder.layers.N.self_attn`).
Inference only: BatchNorm ('frozen_bn' or 'batch_norm') uses its stored statistics and
dropout is the identity in `eval()` mode.

Inputs follow the project's batch contract: image [B, H, W, 3] float (NHWC, normalised,
zero-padded), image_mask [B, H, W] bool, text_ids / text_mask [B, L], caption_in /
caption_mask [B, T]. This file is copied next to the weights by `save_pretrained` and
must import nothing but torch, transformers and the configuration file.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_e2e_vlp import E2EVLPConfig

BN_EPS = 1e-5  # torchvision / DETR FrozenBatchNorm2d
SINE_TEMPERATURE = 10000.0  # DETR
SINE_SCALE = 2 * math.pi  # DETR's normalize=True
INIT_BOX_SIZE = 0.2  # reference-point boxes start as 0.2 x 0.2 of the image


# ---- backbone ---------------------------------------------------------------------------


class FrozenBatchNorm2d(nn.Module):
  """y = (x - mean) / sqrt(var + eps) * weight + bias, all four fixed buffers."""

  def __init__(self, channels: int, eps: float = BN_EPS):
    super().__init__()
    self.eps = eps
    self.register_buffer('weight', torch.ones(channels))
    self.register_buffer('bias', torch.zeros(channels))
    self.register_buffer('running_mean', torch.zeros(channels))
    self.register_buffer('running_var', torch.ones(channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> [B, C, H, W]."""
    scale = self.weight * torch.rsqrt(self.running_var + self.eps)
    shift = self.bias - self.running_mean * scale
    return x * scale[None, :, None, None] + shift[None, :, None, None]


def _norm(kind: str, channels: int) -> nn.Module:
  """The backbone normalisation: BatchNorm with stored statistics, or GroupNorm."""
  if kind in ('frozen_bn', 'batch_norm'):
    return FrozenBatchNorm2d(channels)
  if kind == 'group_norm':
    return nn.GroupNorm(math.gcd(32, channels), channels, eps=BN_EPS)
  raise ValueError(f'backbone_norm={kind!r}; use frozen_bn, batch_norm or group_norm.')


def _conv(cin: int, cout: int, kernel: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
  """Symmetric padding, so a map has ceil(H / stride) rows (as the JAX model)."""
  return nn.Conv2d(cin, cout, kernel, stride=stride, padding=dilation * (kernel - 1) // 2,
                   dilation=dilation, bias=False)


class BasicBlock(nn.Module):
  """Two 3x3 convs (ResNet-18/34); stride on the first."""
  expansion = 1

  def __init__(self, cin: int, features: int, stride: int, dilation: int, norm: str):
    super().__init__()
    self.conv1 = _conv(cin, features, 3, stride, dilation)
    self.bn1 = _norm(norm, features)
    self.conv2 = _conv(features, features, 3, 1, dilation)
    self.bn2 = _norm(norm, features)
    self.downsample = _downsample(cin, features, stride, norm)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 (x4 channels), torchvision v1.5."""
  expansion = 4

  def __init__(self, cin: int, features: int, stride: int, dilation: int, norm: str):
    super().__init__()
    out = features * self.expansion
    self.conv1 = _conv(cin, features, 1)
    self.bn1 = _norm(norm, features)
    self.conv2 = _conv(features, features, 3, stride, dilation)
    self.bn2 = _norm(norm, features)
    self.conv3 = _conv(features, out, 1)
    self.bn3 = _norm(norm, out)
    self.downsample = _downsample(cin, out, stride, norm)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


def backbone_geometry(config: E2EVLPConfig) -> tuple[int, int]:
  """(output channels, output stride) of the configured ResNet."""
  num_stages = len(config.backbone_stage_sizes)
  expansion = Bottleneck.expansion if config.backbone_block == 'bottleneck' else 1
  channels = config.backbone_width * 2 ** (num_stages - 1) * expansion
  stride = (4 if config.backbone_stem == 'imagenet' else 2) * 2 ** (num_stages - 1)
  return channels, stride // 2 if config.backbone_dilation and num_stages > 1 else stride


def _downsample(cin: int, cout: int, stride: int, norm: str) -> nn.Sequential | None:
  if stride == 1 and cin == cout:
    return None
  return nn.Sequential(_conv(cin, cout, 1, stride), _norm(norm, cout))


class ResNet(nn.Module):
  """Feature extractor (no pooling / fc) with torchvision parameter names.

  Its GroupNorm variant keeps the names `bn1`, `bn2`, ... of the JAX model.
  """

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    if config.backbone_block not in ('basic', 'bottleneck'):
      raise ValueError(f'backbone_block={config.backbone_block!r}; use basic or bottleneck.')
    if config.backbone_stem not in ('imagenet', 'small'):
      raise ValueError(f'backbone_stem={config.backbone_stem!r}; use imagenet or small.')
    block = Bottleneck if config.backbone_block == 'bottleneck' else BasicBlock
    width, stages = config.backbone_width, list(config.backbone_stage_sizes)
    self.imagenet_stem = config.backbone_stem == 'imagenet'
    self.conv1 = _conv(3, width, 7 if self.imagenet_stem else 3, 2)
    self.bn1 = _norm(config.backbone_norm, width)
    cin, dilation, last = width, 1, len(stages) - 1
    for i, num_blocks in enumerate(stages):
      stride = 1 if i == 0 else 2
      first_dilation = dilation  # torchvision: the first block keeps the old dilation
      if config.backbone_dilation and i == last and stride == 2:
        dilation, stride = dilation * 2, 1
      blocks = []
      for j in range(num_blocks):
        blocks.append(block(cin, width * 2 ** i, stride if j == 0 else 1,
                            first_dilation if j == 0 else dilation, config.backbone_norm))
        cin = width * 2 ** i * block.expansion
      self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
    self.num_stages = len(stages)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] -> [B, C, ceil(H / S), ceil(W / S)]."""
    x = F.relu(self.bn1(self.conv1(x)))
    if self.imagenet_stem:
      x = F.max_pool2d(x, 3, 2, 1)
    for i in range(self.num_stages):
      x = getattr(self, f'layer{i + 1}')(x)
    return x


# ---- embeddings -------------------------------------------------------------------------


def _interleave_sin_cos(angles: torch.Tensor) -> torch.Tensor:
  """[..., F] -> (sin a0, cos a1, sin a2, cos a3, ...) like DETR."""
  pairs = torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1)
  return pairs.reshape(angles.shape)


def _frequencies(num_feats: int, device: torch.device) -> torch.Tensor:
  i = torch.arange(num_feats, device=device)
  return SINE_TEMPERATURE ** (2 * torch.div(i, 2, rounding_mode='floor') / num_feats)


def sine_position_embedding(mask: torch.Tensor, num_feats: int) -> torch.Tensor:
  """DETR's normalised sine embedding of a padded grid mask [B, h, w] -> [B, h, w, 2F]."""
  m = mask.float()
  y, x = m.cumsum(1), m.cumsum(2)
  y = y / (y[:, -1:, :] + 1e-6) * SINE_SCALE
  x = x / (x[:, :, -1:] + 1e-6) * SINE_SCALE
  freqs = _frequencies(num_feats, mask.device)
  return torch.cat([_interleave_sin_cos(y[..., None] / freqs),
                    _interleave_sin_cos(x[..., None] / freqs)], dim=-1)


def point_sine_embedding(points: torch.Tensor, num_feats: int) -> torch.Tensor:
  """(x, y) points [..., 2] in [0, 1] -> [..., 2F] (y features, x features)."""
  angles = points.float()[..., None] * SINE_SCALE / _frequencies(num_feats, points.device)
  return torch.cat([_interleave_sin_cos(angles[..., 1, :]),
                    _interleave_sin_cos(angles[..., 0, :])], dim=-1)


def cell_centers(image_mask: torch.Tensor, h: int, w: int, stride: int) -> torch.Tensor:
  """[B, h * w, 2] cell centres (cx, cy) relative to the real (unpadded) image."""
  real_h = image_mask[:, :, 0].sum(1).clamp(min=1).float()
  real_w = image_mask[:, 0, :].sum(1).clamp(min=1).float()
  device = image_mask.device
  cx = (torch.arange(w, device=device) + 0.5) * stride / real_w[:, None]  # [B, w]
  cy = (torch.arange(h, device=device) + 0.5) * stride / real_h[:, None]  # [B, h]
  b = image_mask.shape[0]
  centers = torch.stack([cx[:, None, :].expand(b, h, w), cy[:, :, None].expand(b, h, w)], -1)
  return centers.reshape(b, h * w, 2)


class TextEmbeddings(nn.Module):
  """BERT embeddings: word + position + token type 0, LayerNorm, dropout."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    d = config.d_model
    self.word_embeddings = nn.Embedding(config.vocab_size, d)
    self.position_embeddings = nn.Embedding(config.max_text_len, d)
    self.token_type_embeddings = nn.Embedding(config.type_vocab_size, d)
    self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, ids: torch.Tensor) -> torch.Tensor:
    """[B, L] -> [B, L, D]."""
    positions = torch.arange(ids.shape[1], device=ids.device)
    x = (self.word_embeddings(ids) + self.position_embeddings(positions)[None]
         + self.token_type_embeddings(torch.zeros_like(ids)))
    return self.dropout(self.LayerNorm(x))


class VisualEmbeddings(nn.Module):
  """Features -> LayerNorm(1x1 conv + sine position + modality embedding) grid tokens."""

  def __init__(self, config: E2EVLPConfig, in_channels: int, stride: int):
    super().__init__()
    d = config.d_model
    if d % 4:
      raise ValueError(f'd_model={d} must be a multiple of 4 for the 2-D sine embedding.')
    self.stride = stride
    self.projection = nn.Conv2d(in_channels, d, 1)
    self.modality_embedding = nn.Parameter(torch.zeros(d))
    self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, features: torch.Tensor, image_mask: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """features [B, C, h, w], image_mask [B, H, W] -> tokens [B, N, D], mask [B, N],
    pos [B, N, D], cell centres [B, N, 2] (N = h * w, row-major)."""
    b, _, h, w = features.shape
    mask = image_mask[:, ::self.stride, ::self.stride]
    if tuple(mask.shape[1:]) != (h, w):
      raise ValueError(f'Feature grid {(h, w)} does not match the image mask '
                       f'{tuple(image_mask.shape[1:])} at stride {self.stride}.')
    d = self.modality_embedding.shape[0]
    pos = sine_position_embedding(mask, d // 2).to(features.dtype)
    x = self.projection(features).permute(0, 2, 3, 1) + pos + self.modality_embedding
    x = self.dropout(self.LayerNorm(x))
    centers = cell_centers(image_mask, h, w, self.stride)
    return x.reshape(b, h * w, d), mask.reshape(b, h * w), pos.reshape(b, h * w, d), centers


class CaptionEmbeddings(nn.Module):
  """Caption decoder input: (shared) word vectors + learned positions, LayerNorm."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    d = config.d_model
    self.position_embeddings = nn.Embedding(config.max_caption_len, d)
    self.LayerNorm = nn.LayerNorm(d, eps=config.layer_norm_eps)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, word_vectors: torch.Tensor) -> torch.Tensor:
    """[B, T, D] -> [B, T, D]."""
    positions = torch.arange(word_vectors.shape[1], device=word_vectors.device)
    return self.dropout(self.LayerNorm(word_vectors + self.position_embeddings(positions)[None]))


class MLP(nn.Module):
  """DETR's MLP: Linear layers `layers.{i}` with ReLU between them."""

  def __init__(self, din: int, hidden: int, dout: int, num_layers: int):
    super().__init__()
    dims = [din] + [hidden] * (num_layers - 1) + [dout]
    self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = F.relu(x)
    return x


class QueryEmbeddings(nn.Module):
  """Object query positions: learned (`query_embed`) or MLP(sine(reference point))."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    q, d = config.num_queries, config.d_model
    self.use_reference_points = config.reference_points
    if self.use_reference_points:
      self.reference_points = nn.Parameter(torch.zeros(q, 2))  # logits of (x, y)
      self.ref_point_head = MLP(d, d, d, 2)
    else:
      self.query_embed = nn.Parameter(torch.zeros(q, d))

  def forward(self) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> query_pos [Q, D], reference points [Q, 2] in (0, 1) or None."""
    if not self.use_reference_points:
      return self.query_embed, None
    points = torch.sigmoid(self.reference_points)
    d = self.ref_point_head.layers[-1].out_features
    sine = point_sine_embedding(points, d // 2).to(points.dtype)
    return self.ref_point_head(sine), points


# ---- transformer ------------------------------------------------------------------------


class Attention(nn.Module):
  """Multi-head attention; with `out_proj` (DETR) or returning the merged heads (BERT)."""

  def __init__(self, d_model: int, num_heads: int, dropout: float, out_proj: bool):
    super().__init__()
    if d_model % num_heads:
      raise ValueError(f'd_model={d_model} is not divisible by num_heads={num_heads}.')
    self.num_heads = num_heads
    self.query = nn.Linear(d_model, d_model)
    self.key = nn.Linear(d_model, d_model)
    self.value = nn.Linear(d_model, d_model)
    self.dropout = nn.Dropout(dropout)
    self.out_proj = nn.Linear(d_model, d_model) if out_proj else None

  def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """q [B, T, D], k / v [B, S, D], mask bool broadcastable to [B, H, T, S] -> [B, T, D].

    A fully masked row averages the values uniformly (as flax does).
    """
    b, t, d = q.shape
    h = self.num_heads
    split = lambda x: x.reshape(b, x.shape[1], h, d // h).transpose(1, 2)  # [B, H, *, K]
    query = split(self.query(q)) / math.sqrt(d // h)
    scores = (query @ split(self.key(k)).transpose(-1, -2)).float()  # softmax in float32
    if mask is not None:
      scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)
    weights = self.dropout(scores.softmax(-1).to(q.dtype))
    context = (weights @ split(self.value(v))).transpose(1, 2).reshape(b, t, d)
    return context if self.out_proj is None else self.out_proj(context)


class BertOutput(nn.Module):
  """dense -> dropout -> LayerNorm(residual + .)."""

  def __init__(self, din: int, d_model: int, eps: float, dropout: float):
    super().__init__()
    self.dense = nn.Linear(din, d_model)
    self.LayerNorm = nn.LayerNorm(d_model, eps=eps)  # pylint: disable=invalid-name
    self.dropout = nn.Dropout(dropout)

  def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
  """BERT's `attention`: `self` (q/k/v attention) and `output` (dense + LayerNorm)."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    d = config.d_model
    self.self = Attention(d, config.num_heads, config.attention_dropout, out_proj=False)
    self.output = BertOutput(d, d, config.layer_norm_eps, config.dropout)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return self.output(self.self(x, x, x, mask), x)


class BertIntermediate(nn.Module):
  """BERT's `intermediate`: dense to mlp_dim + exact GELU."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    self.dense = nn.Linear(config.d_model, config.mlp_dim)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return F.gelu(self.dense(x))


class EncoderLayer(nn.Module):
  """Post-LayerNorm BERT layer with exact GELU."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    self.attention = BertAttention(config)
    self.intermediate = BertIntermediate(config)
    self.output = BertOutput(config.mlp_dim, config.d_model, config.layer_norm_eps,
                             config.dropout)

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    x = self.attention(x, mask)
    return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
  """BERT layers `layer.{i}`."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    self.layer = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))

  def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, S, D], mask [B, S] bool (True = real) -> [B, S, D]."""
    attn_mask = mask[:, None, None, :]
    for layer in self.layer:
      x = layer(x, attn_mask)
    return x


def _with_pos(x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
  return x if pos is None else x + pos


class DecoderLayer(nn.Module):
  """DETR's post-norm layer: self-attention, cross-attention to memory, ReLU FFN."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    d, heads, drop = config.d_model, config.num_heads, config.attention_dropout
    self.self_attn = Attention(d, heads, drop, out_proj=True)
    self.multihead_attn = Attention(d, heads, drop, out_proj=True)
    self.linear1 = nn.Linear(d, config.mlp_dim)
    self.linear2 = nn.Linear(config.mlp_dim, d)
    eps = config.decoder_layer_norm_eps
    self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(d, eps=eps) for _ in range(3))
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, tgt, query_pos, memory, memory_pos, self_mask, cross_mask):
    q = _with_pos(tgt, query_pos)
    tgt = self.norm1(tgt + self.dropout(self.self_attn(q, q, tgt, self_mask)))
    h = self.multihead_attn(_with_pos(tgt, query_pos), _with_pos(memory, memory_pos), memory,
                            cross_mask)
    tgt = self.norm2(tgt + self.dropout(h))
    h = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
    return self.norm3(tgt + self.dropout(h))


class Decoder(nn.Module):
  """`layers.{i}` and a final LayerNorm `norm` (applied to every returned output)."""

  def __init__(self, config: E2EVLPConfig, num_layers: int):
    super().__init__()
    self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(num_layers))
    self.norm = nn.LayerNorm(config.d_model, eps=config.decoder_layer_norm_eps)

  def forward(self, tgt, query_pos, memory, memory_pos, self_mask, cross_mask,
              return_all: bool = True) -> torch.Tensor:
    """tgt [B, T, D] -> [L, B, T, D] (every layer) or [B, T, D] (the last)."""
    outputs = []
    for layer in self.layers:
      tgt = layer(tgt, query_pos, memory, memory_pos, self_mask, cross_mask)
      if return_all:
        outputs.append(self.norm(tgt))
    return torch.stack(outputs) if return_all else self.norm(tgt)


# ---- heads ------------------------------------------------------------------------------


class PredictionTransform(nn.Module):
  """BERT's `cls.predictions.transform`: dense, exact GELU, LayerNorm."""

  def __init__(self, d: int, eps: float):
    super().__init__()
    self.dense = nn.Linear(d, d)
    self.LayerNorm = nn.LayerNorm(d, eps=eps)  # pylint: disable=invalid-name

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.LayerNorm(F.gelu(self.dense(x)))


class TiedLMHead(nn.Module):
  """logits = [transform](x) @ word_embeddings.T + bias (the table is passed in)."""

  def __init__(self, config: E2EVLPConfig, transform: bool):
    super().__init__()
    self.transform = (PredictionTransform(config.d_model, config.layer_norm_eps)
                      if transform else None)
    self.bias = nn.Parameter(torch.zeros(config.vocab_size))

  def forward(self, x: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
    if self.transform is not None:
      x = self.transform(x)
    return F.linear(x, word_embeddings, self.bias)


class Pooler(nn.Module):
  """tanh(dense(h[:, 0]))."""

  def __init__(self, d: int):
    super().__init__()
    self.dense = nn.Linear(d, d)

  def forward(self, hidden: torch.Tensor) -> torch.Tensor:
    return torch.tanh(self.dense(hidden[:, 0]))


class ClassifierMLP(nn.Module):
  """dense (hidden), GELU, LayerNorm, dense (outputs): the VQA / NLVR2 heads."""

  def __init__(self, din: int, hidden: int, outputs: int, eps: float):
    super().__init__()
    self.dense_0 = nn.Linear(din, hidden)
    self.LayerNorm = nn.LayerNorm(hidden, eps=eps)  # pylint: disable=invalid-name
    self.dense_1 = nn.Linear(hidden, outputs)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.dense_1(self.LayerNorm(F.gelu(self.dense_0(x))))


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
  x = x.clamp(0.0, 1.0)
  return torch.log(x.clamp(min=eps)) - torch.log((1 - x).clamp(min=eps))


class DetectionHead(nn.Module):
  """Class (+ no-object), attribute and box predictions, shared over decoder layers."""

  def __init__(self, config: E2EVLPConfig):
    super().__init__()
    d = config.d_model
    self.reference_points = config.reference_points
    self.class_embed = nn.Linear(d, config.num_classes + 1)
    self.attr_embed = nn.Linear(d, config.num_attributes)
    self.bbox_embed = MLP(d, d, 4, config.box_head_layers)

  def forward(self, hidden: torch.Tensor, reference: torch.Tensor | None
              ) -> dict[str, torch.Tensor]:
    """hidden [Dl, B, Q, D], reference [Q, 2] or None -> class [Dl, B, Q, C+1],
    attribute [Dl, B, Q, A] logits, boxes [Dl, B, Q, 4] (cx, cy, w, h)."""
    out = self.bbox_embed(hidden)
    if self.reference_points:
      center = torch.sigmoid(out[..., :2] + inverse_sigmoid(reference))
      boxes = torch.cat([center, torch.sigmoid(out[..., 2:])], dim=-1)
    else:
      boxes = torch.sigmoid(out)
    return {'det_class_logits': self.class_embed(hidden),
            'det_attr_logits': self.attr_embed(hidden), 'det_boxes': boxes}


# ---- the model --------------------------------------------------------------------------


@dataclasses.dataclass
class E2EVLPOutput(ModelOutput):
  """Pre-training outputs, as the JAX model's `__call__` (absent entries are None).

  mlm_logits [B, L, V], itm_logits [B, 2], det_class_logits [Dl, B, Q, C+1],
  det_attr_logits [Dl, B, Q, A], det_boxes [Dl, B, Q, 4] (index -1 = last decoder layer),
  caption_logits [B, T, V], cell_class_logits [B, N, C+1], visual_mask [B, N] bool,
  cell_centers [B, N, 2].
  """
  mlm_logits: torch.Tensor | None = None
  itm_logits: torch.Tensor | None = None
  det_class_logits: torch.Tensor | None = None
  det_attr_logits: torch.Tensor | None = None
  det_boxes: torch.Tensor | None = None
  caption_logits: torch.Tensor | None = None
  cell_class_logits: torch.Tensor | None = None
  visual_mask: torch.Tensor | None = None
  cell_centers: torch.Tensor | None = None


class E2EVLPPreTrainedModel(PreTrainedModel):
  config_class = E2EVLPConfig
  base_model_prefix = 'e2e_vlp'
  main_input_name = 'image'

  @torch.no_grad()
  def _init_weights(self, module: nn.Module):
    """BERT-style normal(0.02) init; identity BatchNorm; zero output biases."""
    super()._init_weights(module)
    std = self.config.initializer_range
    if isinstance(module, FrozenBatchNorm2d):
      nn.init.ones_(module.weight)
      nn.init.zeros_(module.bias)
      nn.init.zeros_(module.running_mean)
      nn.init.ones_(module.running_var)
    elif isinstance(module, VisualEmbeddings):
      nn.init.normal_(module.modality_embedding, std=std)
    elif isinstance(module, QueryEmbeddings):
      if module.use_reference_points:
        nn.init.uniform_(module.reference_points, -3.0, 3.0)
      else:
        nn.init.normal_(module.query_embed)
    elif isinstance(module, TiedLMHead):
      nn.init.zeros_(module.bias)


class E2EVLPModel(E2EVLPPreTrainedModel):
  """E2E-VLP: ResNet -> BERT cross-modal encoder -> DETR decoder(s) and heads.

  The modules built are `config.built_components()`; a method needing an absent one
  says so.
  """

  def __init__(self, config: E2EVLPConfig):
    super().__init__(config)
    built = set(config.built_components())
    self._built = built
    c = config
    channels, self._stride = backbone_geometry(c)
    modules = {
        'backbone': lambda: ResNet(c),
        'embeddings': lambda: TextEmbeddings(c),
        'visual_embeddings': lambda: VisualEmbeddings(c, channels, self._stride),
        'encoder': lambda: Encoder(c),
        'image_encoder': lambda: Encoder(c),
        'fusion': lambda: Decoder(c, c.fusion_layers),
        'pooler': lambda: Pooler(c.d_model),
        'mlm_head': lambda: TiedLMHead(c, transform=True),
        'itm_head': lambda: nn.Linear(c.d_model, 2),
        'queries': lambda: QueryEmbeddings(c),
        'decoder': lambda: Decoder(c, c.decoder_layers),
        'det_head': lambda: DetectionHead(c),
        'caption_embeddings': lambda: CaptionEmbeddings(c),
        'caption_decoder': lambda: Decoder(c, c.caption_decoder_layers),
        'caption_head': lambda: TiedLMHead(c, transform=False),
        'cell_class_head': lambda: nn.Linear(c.d_model, c.num_classes + 1),
        'vqa_head': lambda: ClassifierMLP(c.d_model, 2 * c.d_model, c.num_answers,
                                          c.layer_norm_eps),
        'nlvr2_head': lambda: ClassifierMLP(2 * c.d_model, 2 * c.d_model, 2,
                                            c.layer_norm_eps),
    }
    for name, make in modules.items():
      if name in built:
        self.add_module(name, make())
    self.post_init()

  def _need(self, *names: str):
    missing = [n for n in names if n not in self._built]
    if missing:
      raise ValueError(f'This checkpoint has no {missing} (its components: '
                       f'{sorted(self._built)}); it cannot run this method.')

  # ---- encoders -----------------------------------------------------------------------

  def _check_image(self, image: torch.Tensor, image_mask: torch.Tensor):
    if image.ndim != 4 or image.shape[-1] != 3 or not image.is_floating_point():
      raise ValueError('image must be float [B, H, W, 3] (NHWC RGB, normalised), got '
                       f'{image.dtype} {tuple(image.shape)}.')
    if tuple(image_mask.shape) != tuple(image.shape[:3]) or image_mask.dtype != torch.bool:
      raise ValueError(f'image_mask must be bool {tuple(image.shape[:3])}, got '
                       f'{image_mask.dtype} {tuple(image_mask.shape)}.')
    if min(image.shape[1:3]) < self._stride:
      raise ValueError(f'image is {tuple(image.shape[1:3])} pixels, smaller than one feature '
                       f'cell ({self._stride} pixels).')

  def visual(self, image: torch.Tensor, image_mask: torch.Tensor):
    """-> tokens [B, N, D], mask [B, N], sine pos [B, N, D], cell centres [B, N, 2]."""
    self._need('backbone', 'visual_embeddings')
    self._check_image(image, image_mask)
    image = image * image_mask[..., None].to(image.dtype)
    features = self.backbone(image.permute(0, 3, 1, 2))
    return self.visual_embeddings(features, image_mask)

  def _image_encoder(self) -> nn.Module:
    name = 'encoder' if self.config.share_encoder else 'image_encoder'
    self._need(name)
    return getattr(self, name)

  def encode_image(self, image: torch.Tensor, image_mask: torch.Tensor):
    """Image-only encoder pass -> memory [B, N, D], memory_mask [B, N], memory_pos [B, N, D]."""
    encoder = self._image_encoder()
    tokens, mask, pos, _ = self.visual(image, image_mask)
    return encoder(tokens, mask), mask, pos

  def _check_tokens(self, ids: torch.Tensor, mask: torch.Tensor | None, limit: int, name: str):
    if ids.ndim != 2 or ids.is_floating_point():
      raise ValueError(f'{name} must be integer [B, L], got {ids.dtype} {tuple(ids.shape)}.')
    if mask is not None and (mask.shape != ids.shape or mask.dtype != torch.bool):
      raise ValueError(f'The mask of {name} must be bool {tuple(ids.shape)}.')
    if ids.shape[1] > limit:
      raise ValueError(f'{name} has {ids.shape[1]} tokens; the position table holds {limit}.')

  def joint_visual_tokens(self, image: torch.Tensor, image_mask: torch.Tensor):
    """The joint pass's image side -> tokens [B, N, D], mask [B, N] (`joint_visual`)."""
    tokens, mask, _, _ = self.visual(image, image_mask)
    if self.config.joint_visual == 'grid':
      return tokens, mask
    return self._image_encoder()(tokens, mask), mask

  def joint(self, text_ids, text_mask, tokens, visual_mask) -> torch.Tensor:
    """The joint pass -> [B, L + N, D] ('merged': the encoder over [CLS] text [SEP] ++
    `joint_visual_tokens`) or [B, L, D] ('cross_attention': `fusion` over the text)."""
    cross_attention = self.config.joint_fusion == 'cross_attention'
    self._need('embeddings', 'fusion' if cross_attention else 'encoder')
    self._check_tokens(text_ids, text_mask, self.config.max_text_len, 'text_ids')
    if cross_attention:
      return self.fusion(self.embeddings(text_ids), None, tokens, None,
                         text_mask[:, None, None, :], visual_mask[:, None, None, :],
                         return_all=False)
    x = torch.cat([self.embeddings(text_ids), tokens], dim=1)
    return self.encoder(x, torch.cat([text_mask, visual_mask], dim=1))

  def encode_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
    """Text-only encoder pass (a BERT) -> [B, L, D]."""
    self._need('embeddings', 'encoder')
    self._check_tokens(text_ids, text_mask, self.config.max_text_len, 'text_ids')
    return self.encoder(self.embeddings(text_ids), text_mask)

  def pooled(self, text_ids, text_mask, image, image_mask) -> torch.Tensor:
    """Joint pass -> pooled [CLS] [B, D]."""
    self._need('pooler')
    tokens, visual_mask = self.joint_visual_tokens(image, image_mask)
    return self.pooler(self.joint(text_ids, text_mask, tokens, visual_mask))

  # ---- decoders -----------------------------------------------------------------------

  def _detect(self, memory, memory_mask, memory_pos) -> dict[str, torch.Tensor]:
    self._need('queries', 'decoder', 'det_head')
    query_pos, reference = self.queries()
    b, q, d = memory.shape[0], query_pos.shape[0], memory.shape[2]
    hidden = self.decoder(memory.new_zeros(b, q, d), query_pos[None], memory, memory_pos,
                          None, memory_mask[:, None, None, :])
    return self.det_head(hidden, reference)

  def detect(self, image: torch.Tensor, image_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """-> det_class_logits, det_attr_logits, det_boxes, each [Dl, B, Q, ...]."""
    return self._detect(*self.encode_image(image, image_mask))

  def caption_logits(self, memory, memory_mask, memory_pos, caption_in: torch.Tensor,
                     caption_mask: torch.Tensor) -> torch.Tensor:
    """Teacher-forced caption logits [B, T, V] (causal; image memory only)."""
    decoder = self.decoder if self.config.share_decoder else getattr(self, 'caption_decoder',
                                                                     None)
    self._need('embeddings', 'caption_embeddings', 'caption_head',
               'decoder' if self.config.share_decoder else 'caption_decoder')
    self._check_tokens(caption_in, caption_mask, self.config.max_caption_len, 'caption_in')
    words = self.embeddings.word_embeddings
    x = self.caption_embeddings(words(caption_in))
    t = caption_in.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=caption_in.device).tril()
    self_mask = causal[None, None] & caption_mask[:, None, None, :]
    hidden = decoder(x, None, memory, memory_pos, self_mask, memory_mask[:, None, None, :],
                     return_all=False)
    return self.caption_head(hidden, words.weight)

  # ---- entry points -------------------------------------------------------------------

  def forward(self, image: torch.Tensor, image_mask: torch.Tensor, text_ids: torch.Tensor,
              text_mask: torch.Tensor, caption_in: torch.Tensor, caption_mask: torch.Tensor,
              **unused_batch_entries) -> E2EVLPOutput:
    """Pre-training pass on a batch dict (`model(**batch)`; other keys are ignored)."""
    del unused_batch_entries  # labels and targets of the batch contract
    self._need('pooler', 'mlm_head', 'itm_head')
    tokens, visual_mask, pos, centers = self.visual(image, image_mask)
    memory = self._image_encoder()(tokens, visual_mask)
    joint_tokens = tokens if self.config.joint_visual == 'grid' else memory
    joint = self.joint(text_ids, text_mask, joint_tokens, visual_mask)
    words = self.embeddings.word_embeddings.weight
    out = {'mlm_logits': self.mlm_head(joint[:, :text_ids.shape[1]], words),
           'itm_logits': self.itm_head(self.pooler(joint))}
    out.update(self._detect(memory, visual_mask, pos))
    out['caption_logits'] = self.caption_logits(memory, visual_mask, pos, caption_in,
                                                caption_mask)
    if 'cell_class_head' in self._built:
      out['cell_class_logits'] = self.cell_class_head(memory)
    return E2EVLPOutput(**out, visual_mask=visual_mask, cell_centers=centers)

  @torch.no_grad()
  def generate_caption(self, image: torch.Tensor, image_mask: torch.Tensor,
                       max_len: int | None = None, bos_id: int | None = None,
                       eos_id: int | None = None, pad_id: int | None = None) -> torch.Tensor:
    """Greedy captions -> [B, max_len] token ids after [BOS]; [EOS] kept, pad_id after it.

    Defaults: max_len = config.max_caption_len, ids from the config (the tokenizer's).
    """
    c = self.config
    max_len = c.max_caption_len if max_len is None else max_len
    bos_id = c.bos_token_id if bos_id is None else bos_id
    eos_id = c.eos_token_id if eos_id is None else eos_id
    pad_id = (c.pad_token_id or 0) if pad_id is None else pad_id
    if bos_id is None or eos_id is None:
      raise ValueError('No [BOS]/[EOS] ids: pass bos_id and eos_id (the config has none).')
    if not 1 <= max_len <= c.max_caption_len:
      raise ValueError(f'max_len={max_len} must be in [1, max_caption_len={c.max_caption_len}].')
    memory, memory_mask, memory_pos = self.encode_image(image, image_mask)
    b = image.shape[0]
    tokens = torch.full((b, max_len), pad_id, dtype=torch.long, device=image.device)
    prefix = torch.full((b, 1), bos_id, dtype=torch.long, device=image.device)
    done = torch.zeros(b, dtype=torch.bool, device=image.device)
    for t in range(max_len):
      mask = torch.ones_like(prefix, dtype=torch.bool)
      logits = self.caption_logits(memory, memory_mask, memory_pos, prefix, mask)[:, -1]
      token = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long),
                          logits.argmax(-1))
      tokens[:, t] = token
      done = done | (token == eos_id)
      if bool(done.all()):
        break
      prefix = torch.cat([prefix, token[:, None]], dim=1)
    return tokens

  def itm_score(self, image, image_mask, text_ids, text_mask, **unused) -> torch.Tensor:
    """Retrieval score [B]: ITM logit('match') - logit('no match')."""
    del unused
    self._need('itm_head')
    logits = self.itm_head(self.pooled(text_ids, text_mask, image, image_mask))
    return logits[:, 1] - logits[:, 0]

  def vqa_logits(self, image, image_mask, text_ids, text_mask, **unused) -> torch.Tensor:
    """Answer logits [B, num_answers]."""
    del unused
    self._need('vqa_head')
    return self.vqa_head(self.pooled(text_ids, text_mask, image, image_mask))

  def nlvr2_logits(self, image0, image0_mask, image1, image1_mask, text_ids, text_mask,
                   **unused) -> torch.Tensor:
    """[B, 2] from the two pooled [CLS] (statement + image0, statement + image1)."""
    del unused
    self._need('nlvr2_head')
    b = text_ids.shape[0]
    pooled = self.pooled(torch.cat([text_ids] * 2), torch.cat([text_mask] * 2),
                         torch.cat([image0, image1]), torch.cat([image0_mask, image1_mask]))
    return self.nlvr2_head(torch.cat([pooled[:b], pooled[b:]], dim=-1))


E2EVLPModel.register_for_auto_class('AutoModel')
