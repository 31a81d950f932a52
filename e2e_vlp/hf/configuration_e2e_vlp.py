"""Hugging Face configuration of the PyTorch E2E-VLP mirror (`modeling_e2e_vlp.py`).

The fields are `config.model` of the JAX project, flattened (`backbone.width` ->
`backbone_width`), plus the tokenizer's special ids and `components`: the top-level
modules the exported checkpoint holds (a VQA fine-tune has no detection decoder, say).
This file is copied next to the weights by `save_pretrained`, so it must import nothing
but transformers.
"""

import dataclasses

from transformers import PretrainedConfig

# Modules of the pre-training network, in the order they are built.
PRETRAIN_COMPONENTS = ('backbone', 'embeddings', 'visual_embeddings', 'encoder',
                       'image_encoder', 'fusion', 'pooler', 'mlm_head', 'itm_head', 'queries',
                       'decoder', 'det_head', 'caption_embeddings', 'caption_decoder',
                       'caption_head', 'cell_class_head')
ALL_COMPONENTS = PRETRAIN_COMPONENTS + ('vqa_head', 'nlvr2_head')


class E2EVLPConfig(PretrainedConfig):
  """E2E-VLP architecture; defaults are the project's `base` variant (ResNet-50, BERT-base)."""

  model_type = 'e2e_vlp'
  attribute_map = {'hidden_size': 'd_model', 'num_attention_heads': 'num_heads',
                   'num_hidden_layers': 'encoder_layers', 'intermediate_size': 'mlp_dim'}

  backbone_block: str = 'bottleneck'
  backbone_stage_sizes: list[int] = dataclasses.field(default_factory=lambda: [3, 4, 6, 3])
  backbone_width: int = 64
  backbone_stem: str = 'imagenet'
  backbone_dilation: bool = False
  # 'frozen_bn' or 'batch_norm' (both use stored statistics here) or 'group_norm'.
  backbone_norm: str = 'frozen_bn'
  vocab_size: int = 30522
  d_model: int = 768
  num_heads: int = 12
  mlp_dim: int = 3072
  encoder_layers: int = 6
  decoder_layers: int = 6
  caption_decoder_layers: int = 6
  share_decoder: bool = True
  share_encoder: bool = True  # False: `image_encoder` feeds the decoders
  joint_visual: str = 'grid'  # or 'image_encoder': the joint pass reads the image encoding
  # or 'cross_attention': the joint pass is `fusion` (DETR decoder layers over the text)
  joint_fusion: str = 'merged'
  fusion_layers: int = 6
  dropout: float = 0.1
  attention_dropout: float = 0.1
  num_queries: int = 100
  max_text_len: int = 512
  max_caption_len: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12  # embeddings, encoder, heads (BERT)
  decoder_layer_norm_eps: float = 1e-5  # detection / caption decoders (DETR)
  num_classes: int = 1600
  num_attributes: int = 400
  box_head_layers: int = 3
  reference_points: bool = False
  cell_class_head: bool = False
  num_answers: int = 0
  # None: the pre-training modules that the flags above call for.
  components: list[str] | None = None
  initializer_range: float = 0.02
  pad_token_id: int | None = 0
  bos_token_id: int | None = None
  eos_token_id: int | None = None

  def built_components(self) -> tuple[str, ...]:
    """The top-level modules the PyTorch model builds, in ALL_COMPONENTS order."""
    if self.components is not None:
      unknown = sorted(set(self.components) - set(ALL_COMPONENTS))
      if unknown:
        raise ValueError(f'Unknown components {unknown} in the config; known: {ALL_COMPONENTS}.')
      return tuple(c for c in ALL_COMPONENTS if c in self.components)
    skip = set()
    if self.share_decoder:
      skip.add('caption_decoder')
    if self.share_encoder:
      skip.add('image_encoder')
    if self.joint_fusion == 'merged':
      skip.add('fusion')
    elif not self.share_encoder:
      skip.add('encoder')  # the image has its own encoder and the text the fusion
    if not self.cell_class_head:
      skip.add('cell_class_head')
    return tuple(c for c in PRETRAIN_COMPONENTS if c not in skip)


E2EVLPConfig.register_for_auto_class()
