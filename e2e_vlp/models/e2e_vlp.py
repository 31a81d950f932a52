"""E2E-VLP (Xu et al., ACL 2021): ResNet -> BERT cross-modal encoder -> DETR decoder.

One module, several entry points (`method=` in `init`/`apply`); fine-tuning heads are
created only by the method that uses them, so `init(..., method=E2EVLP.vqa_logits)`
builds the encoder and the VQA head and nothing else.

Data flow of the pre-training pass (`__call__`):
  image -> backbone -> visual tokens (computed once)
  [CLS] text [SEP] ++ visual tokens -> encoder -> MLM (tied) and ITM (pooled [CLS])
    (or, with joint_fusion='cross_attention': [CLS] text [SEP] -> fusion layers that
    cross-attend to the visual tokens -> MLM and ITM)
  visual tokens alone -> encoder -> memory -> detection decoder (object queries)
                                            -> caption decoder (causal, tied output)
The image-only pass means captions and boxes never see the (possibly masked or
mismatched) encoder text. With `share_encoder=False` the image-only pass has its own
encoder (`image_encoder`, same shape), so the joint encoder's weights are shaped by MLM and
ITM alone rather than mostly by the far denser detection and caption gradients.

Caption decoding with a KV cache (for greedy / beam search):
  memory, memory_mask, memory_pos = model.apply(v, image, image_mask,
                                                method=E2EVLP.encode_image)
  _, state = model.apply(v, memory, memory_mask, memory_pos, max_len, beams,
                         method=E2EVLP.init_caption_cache, mutable=['cache'])
  cache = state['cache']
  logits, state = model.apply({**v, 'cache': cache}, tokens,  # tokens [B * beams, t]
                              method=E2EVLP.caption_step, mutable=['cache'])
  cache = state['cache']  # advanced by t positions
Hypothesis j of image b is row b * beams + j of the tokens and logits. The self-attention
caches hold one row per hypothesis (reorder beams with `jnp.take(leaf, idx, axis=0)`); the
cross-attention caches (`cached_key` / `cached_value` / `cached_mask` of `multihead_attn`)
hold one row per image, shared by its hypotheses, and never need reordering; the int32
scalars `cache_index` / `position_index` are the shared decoding position. Steps past
`max_len` are invalid (not checked inside jit).
"""

import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from e2e_vlp.models import layers
from e2e_vlp.models.embeddings import CaptionEmbeddings
from e2e_vlp.models.embeddings import QueryEmbeddings
from e2e_vlp.models.embeddings import TextEmbeddings
from e2e_vlp.models.embeddings import VisualEmbeddings
from e2e_vlp.models.heads import ClassifierMLP
from e2e_vlp.models.heads import DetectionHead
from e2e_vlp.models.heads import Pooler
from e2e_vlp.models.heads import TiedLMHead
from e2e_vlp.models.resnet import ResNet
from e2e_vlp.models.resnet import output_stride
from e2e_vlp.models.transformer import Decoder
from e2e_vlp.models.transformer import Encoder

Batch = dict[str, jnp.ndarray]
JOINT_VISUAL = ('grid', 'image_encoder')  # what the joint pass sees of the image
# How the joint pass mixes text and image: 'merged' (paper) one encoder over the text and
# image tokens together; 'cross_attention' text-only layers that cross-attend to the image.
JOINT_FUSION = ('merged', 'cross_attention')
# Batch entries that hold an image [B, H, W, 3] or its mask [B, H, W]: 'image', 'image0_mask'.
_IMAGE_INPUT = re.compile(r'image\d*(_mask)?')


def init_inputs(config: ml_collections.ConfigDict, spec: Mapping[str, Any]) -> Batch:
  """Zeros for `E2EVLP(config).init`: `spec` (name -> object with .shape/.dtype) with every
  image and image mask shrunk to one feature cell, S x S pixels (S the output stride).

  No variable's shape depends on the image size (visual positions are sine functions of
  the grid) and flax draws each initial value from the module path, not the input, so the
  variables equal a full-size init's (tests/test_models.py). The init then compiles and
  runs the backbone on one cell instead of the training canvas.
  """
  b = config.backbone
  side = output_stride(b.stem, len(b.stage_sizes), b.dilation)
  out = {}
  for name, value in spec.items():
    shape = tuple(value.shape)
    if _IMAGE_INPUT.fullmatch(name):
      shape = shape[:1] + (side, side) + shape[3:]
    out[name] = jnp.zeros(shape, value.dtype)
  return out


def _check_image(image: jnp.ndarray, image_mask: jnp.ndarray, stride: int, name: str = 'image'):
  """Trace-time checks of an image and its mask."""
  if image.ndim != 4 or image.shape[-1] != 3:
    raise ValueError(f'{name} must be [B, H, W, 3] (NHWC RGB), got shape {image.shape}.')
  if not jnp.issubdtype(image.dtype, jnp.floating):
    raise ValueError(f'{name} must hold normalised float pixels, got dtype {image.dtype}.')
  if image_mask.shape != image.shape[:3] or image_mask.dtype != jnp.bool_:
    raise ValueError(f'{name}_mask must be bool {image.shape[:3]} (True on real pixels), '
                     f'got {image_mask.dtype} {image_mask.shape}.')
  height, width = image.shape[1:3]
  if height < stride or width < stride:
    raise ValueError(
        f'{name} is {height}x{width} pixels, smaller than one feature cell: the backbone '
        f'has output stride {stride}, so images must be at least {stride}x{stride}. Use a '
        'larger canvas (config.data.image_size) or a smaller stride '
        "(config.model.backbone.stem='small' or dilation=True).")


def _check_tokens(ids: jnp.ndarray, mask: jnp.ndarray | None, max_len: int, name: str,
                  limit_key: str):
  """Trace-time checks of token ids [B, L] (and their bool mask)."""
  if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f'{name} must be integer [B, L], got {ids.dtype} {ids.shape}.')
  if mask is not None and (mask.shape != ids.shape or mask.dtype != jnp.bool_):
    raise ValueError(f'The mask of {name} must be bool {ids.shape}, '
                     f'got {mask.dtype} {mask.shape}.')
  if ids.shape[1] > max_len:
    raise ValueError(
        f'{name} has {ids.shape[1]} tokens but the position table holds '
        f'config.model.{limit_key}={max_len}; shorten the sequences in the data config '
        f'or raise config.model.{limit_key}.')


class E2EVLP(nn.Module):
  """The E2E-VLP network; `config` is the `config.model` ConfigDict.

  Optional config fields read here: `num_answers` (VQA head size, default 0 = none).
  Collections: 'params' (trained), 'batch_stats' (frozen BatchNorm; with
  backbone.norm='batch_norm' apply with mutable=['batch_stats'] when train=True),
  'cache' (caption decoding only). Dropout uses the 'dropout' rng when train=True.
  """
  config: ml_collections.ConfigDict

  @property
  def dtype(self) -> jnp.dtype:
    return layers.compute_dtype(self.config.dtype)

  def setup(self):
    c = self.config
    dtype = self.dtype
    b = c.backbone
    self.backbone = ResNet(block=b.block, stage_sizes=tuple(b.stage_sizes), width=b.width,
                           stem=b.stem, dilation=b.dilation, norm=b.norm,
                           stem_conv=b.stem_conv, max_pool=b.max_pool,
                           pointwise_conv=b.pointwise_conv, relu=b.relu,
                           dtype=dtype)
    eps = c.layer_norm_eps
    self.embeddings = TextEmbeddings(c.vocab_size, c.max_text_len, c.type_vocab_size,
                                     c.d_model, eps, c.dropout, dtype)
    self.visual_embeddings = VisualEmbeddings(c.d_model, self.backbone.output_stride, eps,
                                              c.dropout, dtype)
    stack = dict(d_model=c.d_model, num_heads=c.num_heads, mlp_dim=c.mlp_dim, epsilon=eps,
                 dropout=c.dropout, attention_dropout=c.attention_dropout, remat=c.remat,
                 dtype=dtype)
    # DETR's LayerNorm eps: its first decoder layer normalises the zero target plus a zero
    # attention output, where BERT's 1e-12 turns the LayerNorm gradient into ~1e6.
    decoder_stack = dict(stack, epsilon=c.decoder_layer_norm_eps)
    self.encoder = Encoder(c.encoder_layers, **stack)
    if not c.share_encoder:
      self.image_encoder = Encoder(c.encoder_layers, **stack)
    if c.joint_fusion == 'cross_attention':
      self.fusion = Decoder(c.fusion_layers, **decoder_stack)
    self.pooler = Pooler(dtype)
    self.mlm_head = TiedLMHead(c.vocab_size, eps, transform=True, dtype=dtype)
    self.itm_head = layers.dense(2, ('embed', None), dtype=dtype)
    self.queries = QueryEmbeddings(c.num_queries, c.d_model, c.reference_points, dtype)
    self.decoder = Decoder(c.decoder_layers, **decoder_stack)
    self.det_head = DetectionHead(c.num_classes, c.num_attributes, c.box_head_layers,
                                  c.reference_points, dtype)
    self.caption_embeddings = CaptionEmbeddings(c.max_caption_len, c.d_model, eps, c.dropout,
                                                dtype)
    if not c.share_decoder:
      self.caption_decoder = Decoder(c.caption_decoder_layers, **decoder_stack)
    self.caption_head = TiedLMHead(c.vocab_size, eps, transform=False, dtype=dtype)
    if c.cell_class_head:
      self.cell_class_head = layers.dense(c.num_classes + 1, ('embed', 'classes'), dtype=dtype)
    self.vqa_head = ClassifierMLP(2 * c.d_model, c.get('num_answers', 0), eps, dtype)
    self.nlvr2_head = ClassifierMLP(2 * c.d_model, 2, eps, dtype)

  # ---- encoders -----------------------------------------------------------------------

  def _visual(self, image, image_mask, train):
    """-> tokens [B, N, D], mask [B, N], sine pos [B, N, D], cell centres [B, N, 2]."""
    _check_image(image, image_mask, self.backbone.output_stride)
    # A select, not a multiply by the mask: NaN or inf padding times 0 stays non-finite.
    image = jnp.where(image_mask[..., None], image, jnp.zeros((), image.dtype))
    features = self.backbone(image, train=train)
    return self.visual_embeddings(features, image_mask, train=train)

  def joint_visual_tokens(self, image: jnp.ndarray, image_mask: jnp.ndarray, *,
                          train: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The image side of the joint pass: tokens [B, N, D], mask [B, N] bool.

    `config.joint_visual`: 'grid' (paper) the embedded backbone grid; 'image_encoder' the
    image-only encoding (the decoders' memory), so the text attends to contextualised cells.
    Retrieval caches these per image and scores many captions against them with `joint`.
    """
    tokens, mask, _, _ = self._visual(image, image_mask, train)
    if self._joint_reads_image_encoder():
      tokens = self._image_encoder()(tokens, mask, deterministic=not train)
    return tokens, mask

  def _joint_reads_image_encoder(self) -> bool:
    if self.config.joint_visual not in JOINT_VISUAL:
      raise ValueError(f'config.model.joint_visual={self.config.joint_visual!r}; use one of '
                       f'{JOINT_VISUAL}.')
    return self.config.joint_visual == 'image_encoder'

  def joint(self, text_ids: jnp.ndarray, text_mask: jnp.ndarray, tokens: jnp.ndarray,
            visual_mask: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """The joint pass over [CLS] text [SEP] and `joint_visual_tokens` [B, N, D].

    Returns [B, L + N, D] ('merged': the encoder over text ++ image tokens) or [B, L, D]
    ('cross_attention': the fusion layers' text, which attends to the image tokens by
    cross-attention; their sine positions are already in them); the text comes first.
    """
    _check_tokens(text_ids, text_mask, self.config.max_text_len, 'text_ids', 'max_text_len')
    text = self.embeddings(text_ids, train=train)
    if self.config.joint_fusion not in JOINT_FUSION:
      raise ValueError(f'config.model.joint_fusion={self.config.joint_fusion!r}; use one of '
                       f'{JOINT_FUSION}.')
    if self.config.joint_fusion == 'cross_attention':
      return self.fusion(text, None, tokens.astype(text.dtype), None,
                         text_mask[:, None, None, :], visual_mask[:, None, None, :],
                         deterministic=not train, return_all=False)
    x = jnp.concatenate([text, tokens.astype(text.dtype)], axis=1)
    mask = jnp.concatenate([text_mask, visual_mask], axis=1)
    return self.encoder(x, mask, deterministic=not train)

  def encode_image(self, image: jnp.ndarray, image_mask: jnp.ndarray, *, train: bool = False
                   ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Image-only encoder pass, the decoders' memory.

    Args:
      image: [B, H, W, 3] float; image_mask: [B, H, W] bool.

    Returns:
      memory [B, N, D], memory_mask [B, N] bool, memory_pos [B, N, D] (the sine
      position embedding the decoders add to their cross-attention keys).
    """
    tokens, mask, pos, _ = self._visual(image, image_mask, train)
    return self._image_encoder()(tokens, mask, deterministic=not train), mask, pos

  def _image_encoder(self) -> Encoder:
    return self.encoder if self.config.share_encoder else self.image_encoder

  def pooled(self, text_ids: jnp.ndarray, text_mask: jnp.ndarray, image: jnp.ndarray,
             image_mask: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Joint pass -> BERT-pooled [CLS] [B, D]."""
    tokens, visual_mask = self.joint_visual_tokens(image, image_mask, train=train)
    return self.pooler(self.joint(text_ids, text_mask, tokens, visual_mask, train=train))

  # ---- decoders -----------------------------------------------------------------------

  def _detect(self, memory, memory_mask, memory_pos, train) -> Batch:
    query_pos, reference = self.queries()
    b, q, d = memory.shape[0], self.config.num_queries, self.config.d_model
    hidden = self.decoder(jnp.zeros((b, q, d), memory.dtype), query_pos[None], memory,
                          memory_pos, None, memory_mask[:, None, None, :],
                          deterministic=not train)
    return self.det_head(hidden, reference)

  def detect(self, image: jnp.ndarray, image_mask: jnp.ndarray, *, train: bool = False
             ) -> Batch:
    """-> det_class_logits [Dl, B, Q, C+1], det_attr_logits [Dl, B, Q, A], det_boxes
    [Dl, B, Q, 4] (cx, cy, w, h relative to the real image); index -1 = last layer."""
    return self._detect(*self.encode_image(image, image_mask, train=train), train)

  def _caption_decoder(self) -> Decoder:
    return self.decoder if self.config.share_decoder else self.caption_decoder

  def caption_logits(self, memory: jnp.ndarray, memory_mask: jnp.ndarray,
                     memory_pos: jnp.ndarray, caption_in: jnp.ndarray,
                     caption_mask: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Teacher-forced caption logits [B, T, V] float32 (causal; image memory only).

    Args:
      memory, memory_mask, memory_pos: from `encode_image`.
      caption_in: [B, T] int ([BOS] ...); caption_mask: [B, T] bool.
    """
    _check_tokens(caption_in, caption_mask, self.config.max_caption_len, 'caption_in',
                  'max_caption_len')
    x = self.caption_embeddings(self.embeddings.embed_words(caption_in), train=train)
    length = caption_in.shape[1]
    causal = jnp.tril(jnp.ones((length, length), jnp.bool_))
    self_mask = causal[None, None] & caption_mask[:, None, None, :]
    hidden = self._caption_decoder()(
        x, None, memory, memory_pos, self_mask, memory_mask[:, None, None, :],
        deterministic=not train, return_all=False)
    return self.caption_head(hidden, self.embeddings.attend)

  def init_caption_cache(self, memory: jnp.ndarray, memory_mask: jnp.ndarray,
                         memory_pos: jnp.ndarray, max_len: int, beams: int = 1) -> None:
    """Creates the 'cache' collection for decoding up to `max_len` tokens (see top).

    Stores each layer's cross-attention keys/values of `memory` [B, N, D] once per image
    and empty self-attention caches [B * beams, max_len, H, K] (`beams` hypotheses per
    image); apply with mutable=['cache'].
    """
    if not 1 <= max_len <= self.config.max_caption_len:
      raise ValueError(f'max_len={max_len} must be in [1, config.model.max_caption_len='
                       f'{self.config.max_caption_len}].')
    if beams < 1:
      raise ValueError(f'beams={beams} must be at least 1 (hypotheses per image).')
    tokens = jnp.zeros((memory.shape[0] * beams, max_len), jnp.int32)
    x = self.caption_embeddings(self.embeddings.embed_words(tokens), train=False,
                                decode='init')
    causal = jnp.tril(jnp.ones((max_len, max_len), jnp.bool_))[None, None]
    self._caption_decoder()(x, None, memory, memory_pos, causal, memory_mask[:, None, None, :],
                            deterministic=True, decode='init', return_all=False)

  def caption_step(self, tokens: jnp.ndarray) -> jnp.ndarray:
    """Next-token logits [B * beams, t, V] float32 for `tokens` [B * beams, t] (beams as
    given to `init_caption_cache`) at the cached position.

    Equals `caption_logits` at those positions given the same earlier tokens.
    """
    _check_tokens(tokens, None, self.config.max_caption_len, 'tokens', 'max_caption_len')
    x = self.caption_embeddings(self.embeddings.embed_words(tokens), train=False,
                                decode='step')
    hidden = self._caption_decoder()(x, None, None, None, None, None, deterministic=True,
                                     decode='step', return_all=False)
    return self.caption_head(hidden, self.embeddings.attend)

  # ---- pre-training -------------------------------------------------------------------

  def __call__(self, batch: Batch, *, train: bool) -> Batch:
    """Pre-training outputs (all float32).

    Args:
      batch: image [B, H, W, 3], image_mask [B, H, W], text_ids / text_mask [B, L],
        caption_in / caption_mask [B, T]; other keys are ignored.

    Returns:
      mlm_logits [B, L, V], itm_logits [B, 2], det_class_logits [Dl, B, Q, C+1],
      det_attr_logits [Dl, B, Q, A], det_boxes [Dl, B, Q, 4], caption_logits
      [B, T, V], cell_class_logits [B, N, C+1] (if config.cell_class_head),
      visual_mask [B, N] bool, cell_centers [B, N, 2].
    """
    tokens, visual_mask, pos, centers = self._visual(batch['image'], batch['image_mask'], train)
    memory = self._image_encoder()(tokens, visual_mask, deterministic=not train)
    joint_tokens = memory if self._joint_reads_image_encoder() else tokens
    joint = self.joint(batch['text_ids'], batch['text_mask'], joint_tokens, visual_mask,
                       train=train)
    text_len = batch['text_ids'].shape[1]
    out = {
        'mlm_logits': self.mlm_head(joint[:, :text_len], self.embeddings.attend),
        'itm_logits': self.itm_head(self.pooler(joint)).astype(jnp.float32),
    }
    out.update(self._detect(memory, visual_mask, pos, train))
    out['caption_logits'] = self.caption_logits(memory, visual_mask, pos, batch['caption_in'],
                                                batch['caption_mask'], train=train)
    if self.config.cell_class_head:
      out['cell_class_logits'] = self.cell_class_head(memory).astype(jnp.float32)
    out['visual_mask'] = visual_mask
    out['cell_centers'] = centers
    return out

  # ---- fine-tuning heads --------------------------------------------------------------

  def itm_score(self, batch: Batch, *, train: bool = False) -> jnp.ndarray:
    """Retrieval score [B]: ITM logit('match') - logit('no match') (log-odds)."""
    logits = self.itm_head(self.pooled(batch['text_ids'], batch['text_mask'], batch['image'],
                                       batch['image_mask'], train=train)).astype(jnp.float32)
    return logits[:, 1] - logits[:, 0]

  def vqa_logits(self, batch: Batch, *, train: bool = False) -> jnp.ndarray:
    """Answer logits [B, num_answers] from the pooled [CLS] (for soft BCE)."""
    if self.config.get('num_answers', 0) <= 0:
      raise ValueError('The VQA head needs config.model.num_answers > 0 '
                       '(the answer vocabulary size).')
    return self.vqa_head(self.pooled(batch['text_ids'], batch['text_mask'], batch['image'],
                                     batch['image_mask'], train=train))

  def nlvr2_logits(self, batch: Batch, *, train: bool = False) -> jnp.ndarray:
    """[B, 2] from the two pooled [CLS] (statement + image0, statement + image1).

    batch: text_ids, text_mask, image0, image0_mask, image1, image1_mask. Both pairs go
    through the network as one batch of 2B.
    """
    b = batch['text_ids'].shape[0]
    for i in (0, 1):
      _check_image(batch[f'image{i}'], batch[f'image{i}_mask'], self.backbone.output_stride,
                   name=f'image{i}')
    image = jnp.concatenate([batch['image0'], batch['image1']], axis=0)
    image_mask = jnp.concatenate([batch['image0_mask'], batch['image1_mask']], axis=0)
    text_ids = jnp.concatenate([batch['text_ids']] * 2, axis=0)
    text_mask = jnp.concatenate([batch['text_mask']] * 2, axis=0)
    pooled = self.pooled(text_ids, text_mask, image, image_mask, train=train)
    return self.nlvr2_head(jnp.concatenate([pooled[:b], pooled[b:]], axis=-1))
