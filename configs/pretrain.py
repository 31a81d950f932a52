"""Pre-training configs: `get_config('tiny')` (laptop CPU) and `get_config('base')` (paper).

Every value the E2E-VLP paper (Xu et al., ACL 2021) does not state carries a comment with
the source of its default: DETR (Carion et al., 2020), BERT-base, or "assumed".

Use: `python launch/train.py --config configs/pretrain.py:base --config.optim.lr=1e-4`.
"""

import ml_collections

VARIANTS = ('tiny', 'base')


def model_config(variant: str) -> ml_collections.ConfigDict:
  """The architecture; shared by every task config (fine-tuning adds heads, not changes)."""
  m = ml_collections.ConfigDict()
  m.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
  m.remat = False  # rematerialize each transformer layer in the backward pass

  b = m.backbone = ml_collections.ConfigDict()
  # 'frozen_bn' (DETR: pretrained BatchNorm statistics and affine frozen) or 'group_norm'
  # (trainable, for backbones trained from scratch); see e2e_vlp/models/resnet.py.
  b.norm = 'frozen_bn'
  b.dilation = False  # True: last stage dilated, output stride 16 (DETR-DC5)
  # 'imagenet': 7x7/2 conv + 3x3/2 max-pool (output stride 32);
  # 'small': one 3x3/2 conv, no pool (output stride 16, for small images).
  b.stem = 'imagenet'
  # How the stem computes, not what (e2e_vlp/models/resnet.py): XLA's own convolution and
  # max-pool ('conv', 'reduce_window'), or forms XLA:CPU runs faster ('row_fold': the
  # kernel's rows folded into channels; 'unrolled': the pool as a maximum of strided
  # slices; the DETR step ~10% faster, tiny's pre-training step not). README "Benchmarks".
  b.stem_conv = 'conv'
  b.max_pool = 'reduce_window'
  # The bottleneck blocks' 1x1 convs: 'dot' (a matrix product over channels, with the
  # kernel gradient's cheaper transpose; r50 DETR step 1.01x instead of 1.49x HF's on
  # XLA:CPU, and a GEMM either way on a GPU or TPU) or 'conv' (XLA's convolution).
  b.pointwise_conv = 'dot'
  # 'materialized': each ReLU output passes an identity XLA computes once, so the kernel
  # gradients transpose stored activations instead of recomputing BatchNorm + ReLU inside
  # slow fused transposes (XLA:CPU: r50 DETR step 1.5-10% faster, pre-training 2.7%; the
  # same function, kernel gradients rounded apart by ~1e-9).
  # 'plain': `nn.relu` alone (also what 'materialized' is off the CPU backend).
  # e2e_vlp/materialize.py.
  b.relu = 'materialized'

  if variant == 'tiny':
    b.block = 'basic'
    # Three stages after the ImageNet stem: output stride 16, a 6x6 grid at 96x96, and a
    # quarter of the FLOPs of four stages after the stride-2 'small' stem.
    b.stage_sizes = (1, 1, 1)
    b.width = 32  # channels of stage 1; doubled at each later stage (assumed)
    b.norm = 'group_norm'  # trained from scratch: frozen identity BN lets activations explode
    # Its only 1x1 convs are two shortcuts; 'conv' keeps the rounding of the measured
    # default run (README "What the default run reaches": ITM is sensitive to it).
    b.pointwise_conv = 'conv'
    b.relu = 'plain'  # likewise: the measured default run's rounding
    m.d_model = 128
    m.num_heads = 4
    m.mlp_dim = 512
    m.encoder_layers = 2
    m.decoder_layers = 3
    m.caption_decoder_layers = 2
    m.share_decoder = False  # separate caption decoder learns faster at this size
    # Convergence aids for the joint pass (README "Convergence aids"): the decoders get an
    # encoder of their own, and the joint pass reads its output instead of the raw grid.
    m.share_encoder = False
    m.joint_visual = 'image_encoder'
    # The joint pass as text-only layers that cross-attend to the image (the decoders'
    # layer; ALBEF's and BLIP's fusion): four of them cost the step what two merged layers
    # did and learn ITM far faster (README "Cross-attention fusion").
    m.joint_fusion = 'cross_attention'
    m.fusion_layers = 4
    m.dropout = 0.0
    m.attention_dropout = 0.0
    m.num_queries = 20
    m.vocab_size = 512  # sentencepiece vocabulary trained on the embedded corpus
    m.max_text_len = 32  # size of the text position table
    m.num_classes = 6
    m.num_attributes = 12  # 6 colours + 2 sizes, padded (assumed)
    m.reference_points = True  # convergence aid, see README "Convergence aids"
    m.cell_class_head = True  # per-grid-cell class logits for an auxiliary encoder loss
  elif variant == 'base':
    b.block = 'bottleneck'
    b.stage_sizes = (3, 4, 6, 3)  # ResNet-50, the paper's backbone
    b.width = 64
    m.d_model = 768  # paper: BERT-base width
    m.num_heads = 12  # paper
    m.mlp_dim = 3072  # BERT-base
    m.encoder_layers = 6  # paper compares 6 and 12; 6 is its ResNet-50 setting
    m.decoder_layers = 6  # paper / DETR
    m.caption_decoder_layers = 6  # used only when share_decoder is False
    m.share_decoder = True  # paper: one decoder for detection and captioning
    m.share_encoder = True  # paper: one encoder (its image-only pass feeds the decoders)
    m.joint_visual = 'grid'  # paper: the joint pass reads the backbone grid
    m.joint_fusion = 'merged'  # paper: one encoder over the text and image tokens
    m.fusion_layers = 6  # used by joint_fusion='cross_attention' only (assumed: as encoder)
    m.dropout = 0.1  # BERT-base / DETR
    m.attention_dropout = 0.1  # BERT-base
    m.num_queries = 100  # DETR
    m.vocab_size = 30522  # BERT-base uncased WordPiece
    m.max_text_len = 512  # BERT-base position table
    m.num_classes = 1600  # Visual Genome object vocabulary (Anderson et al. 2018)
    m.num_attributes = 400  # Visual Genome attribute vocabulary
    m.reference_points = False  # the paper's plain DETR queries
    m.cell_class_head = False
  else:
    raise ValueError(f'Unknown variant {variant!r}; use one of {VARIANTS}.')
  m.type_vocab_size = 2  # BERT: token types; images use a separate modality embedding
  m.layer_norm_eps = 1e-12  # BERT (embeddings, encoder)
  m.decoder_layer_norm_eps = 1e-5  # DETR (decoders)
  m.box_head_layers = 3  # DETR
  m.max_caption_len = m.max_text_len
  m.num_answers = 0  # VQA answer vocabulary; set by configs/vqa.py
  return m


def data_config(variant: str) -> ml_collections.ConfigDict:
  d = ml_collections.ConfigDict()
  d.dataset = 'embedded'  # 'embedded' | 'coco_captions' | 'coco_instances' | 'visual_genome'
  d.data_dir = ''  # TFDS data dir; '' -> <cache>/tfds/<key> (the embedded corpus is built there)
  d.manual_dir = ''  # raw files; '' -> the embedded corpus is generated into <cache>/raw
  d.train_split = 'train'
  d.eval_split = 'val'
  # A WordPiece vocab.txt (BERT's, or one learned with launch/train_tokenizer.py);
  # '' -> learned from the embedded corpus' captions on first use.
  d.tokenizer = ''
  d.max_boxes = 8 if variant == 'tiny' else 100  # targets padded to this count (assumed)
  d.max_attributes = 4  # attribute ids per box, padded with -1 (the builders' constant)
  d.max_text_len = 24 if variant == 'tiny' else 40  # encoder text incl. [CLS]/[SEP] (assumed)
  d.max_caption_len = 24 if variant == 'tiny' else 40  # decoder tokens incl. [BOS]/[EOS]
  d.image_size = 96 if variant == 'tiny' else 800  # padded canvas side (DETR: 800)
  # Random shorter-side resize choices; DETR uses 480..800 in steps of 32.
  d.resize_sizes = (80, 88, 96) if variant == 'tiny' else tuple(range(480, 801, 32))
  d.max_size = 96 if variant == 'tiny' else 1333  # longer-side cap (DETR)
  d.hflip_prob = 0.5  # DETR
  d.crop_prob = 0.0 if variant == 'tiny' else 0.5  # DETR's random crop
  # DETR's crop branch: resize to one of these, crop a random [min, max] square-ish window.
  d.crop_resize_sizes = (48, 60, 72) if variant == 'tiny' else (400, 500, 600)  # DETR
  d.crop_min_size = 46 if variant == 'tiny' else 384  # DETR
  d.crop_max_size = 72 if variant == 'tiny' else 600  # DETR
  d.prefetch = 2  # batches prepared ahead (each is part of the saved iterator state)
  # tf.data autotuning: off, each parallel map runs one call per core; on, its model thread
  # delayed a run's exit by up to a minute after the final checkpoint (pipeline.build).
  d.tf_data_autotune = False
  # BERT: 0.15. tiny masks 0.4 (Wettig et al., 2023, "Should You Mask 15% in MLM?"): the
  # joint pass learns to read the image from masked colour and shape words, and at 0.15 a
  # batch holds too few of them for it to ground within 2,000 steps (README).
  d.mlm_prob = 0.4 if variant == 'tiny' else 0.15
  d.itm_neg_prob = 0.5  # paper
  d.shuffle_buffer = 4096
  d.seed = 0  # the evaluation pipeline's draws (ITM negatives, MLM masks); train: train.seed
  d.corpus_seed = 0  # the embedded corpus' generator (part of its cache key)
  d.corpus_train_images = 20000  # size of the embedded corpus' train split
  d.corpus_val_images = 500
  d.corpus_image_size = 96  # side of the generated images
  return d


def get_config(arg: str = 'tiny') -> ml_collections.ConfigDict:
  variant = arg or 'tiny'
  config = ml_collections.ConfigDict()
  config.task = 'pretrain'
  config.variant = variant
  config.model = model_config(variant)
  config.data = data_config(variant)

  loss = config.loss = ml_collections.ConfigDict()
  loss.mlm = 1.0  # assumed: the paper sums the task losses
  loss.itm = 1.0
  loss.detection = 1.0
  loss.caption = 1.0
  # Convergence aid (needs cell_class_head); 5.0 on tiny: the per-cell signal must not be
  # drowned by the early, noisy detection gradients through the shared backbone.
  loss.cell_class = 5.0 if variant == 'tiny' else 0.0
  loss.mlm_on_negatives = False  # MLM only on matched pairs (UNITER)
  loss.label_smoothing = 0.0  # caption LM
  det = loss.det = ml_collections.ConfigDict()
  det.cost_class = 1.0  # DETR matching cost weights
  det.cost_bbox = 5.0
  det.cost_giou = 2.0
  det.loss_ce = 1.0  # DETR loss weights
  det.loss_bbox = 5.0
  det.loss_giou = 2.0
  det.loss_attr = 1.0  # assumed
  det.eos_coef = 0.1  # DETR no-object class weight
  det.aux_loss = True  # DETR: the same loss on every decoder layer
  det.matcher = 'hungarian'  # 'hungarian' (in-graph, jittable) | 'scipy' (host callback)

  o = config.optim = ml_collections.ConfigDict()
  o.lr = 1e-3 if variant == 'tiny' else 1e-4  # DETR 1e-4 for the transformer
  o.weight_decay = 1e-4  # DETR
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.warmup_steps = 100 if variant == 'tiny' else 10000  # assumed
  o.schedule = 'cosine'  # 'cosine' | 'linear' | 'constant'
  o.end_lr_factor = 0.01 if variant == 'tiny' else 0.0
  o.clip_norm = 0.1  # DETR
  # (regex on the '/'-joined parameter path, multiplier); first match wins.
  # tiny: a backbone trained from scratch learns its per-cell classes faster at 3e-3.
  o.lr_mults = (('backbone/.*', 3.0 if variant == 'tiny' else 0.1),)  # DETR: backbone 0.1x
  # DETR: stem and first stage frozen (torchvision names: conv1, bn1, layer1).
  o.frozen = () if variant == 'tiny' else (r'backbone/(conv1|layer1_\d+)/.*',)
  o.no_decay = (r'.*(bias|scale|embedding|pos_embed|LayerNorm.*)$',)
  o.grad_accum_steps = 1
  # How the AdamW update computes, not what (e2e_vlp/train/optimizer.py `_fused_adamw`): True
  # selects the non-finite guard before the moments are read and clips by a multiply, so
  # XLA:CPU updates parameters and moments in place instead of copying both moments first
  # (r50 DETR optimizer update 0.3-0.4x the optax chain's time); False: the optax chain.
  # tiny keeps the chain: the measured default run's rounding.
  o.fused_update = variant != 'tiny'

  mesh = config.mesh = ml_collections.ConfigDict()
  mesh.data = -1  # -1: all devices not used by the other axes
  mesh.fsdp = 1
  mesh.model = 1
  config.sharding = 'dp'  # 'dp' | 'fsdp' | 'tp' | 'fsdp_tp'; see e2e_vlp/train/sharding.py

  t = config.train = ml_collections.ConfigDict()
  t.batch_size = 32 if variant == 'tiny' else 256  # global batch (assumed)
  t.total_steps = 2000 if variant == 'tiny' else 300000  # assumed
  t.seed = 0
  t.log_every = 50
  # tiny: the held-out evaluation costs ~7 s, so the default run evaluates at 1,000 and
  # 2,000 only (checkpoints stay every 500).
  t.eval_every = 1000 if variant == 'tiny' else 5000
  t.eval_batches = 8 if variant == 'tiny' else 100
  t.checkpoint_every = 500 if variant == 'tiny' else 5000
  t.keep_checkpoints = 3
  # orbax writes a replicated array split over its replicas only when each slice holds at
  # least this many bytes; smaller arrays are written by one replica (no per-shape slice
  # compiles: e2e_vlp/train/checkpoint.py state_handler). 0: orbax's default, always split.
  t.checkpoint_replica_parallel_min_bytes = 1 << 20
  # Compiled programs (the step, the state's init, the evaluation) persist here, so a
  # restarted run or launch/eval.py loads them instead of compiling (default run: 33 -> 11 s
  # to the first step on 2 cores; README). Relative: inside the workdir; '' off. A cache
  # directory the process already has (JAX_COMPILATION_CACHE_DIR) is used instead.
  t.compilation_cache_dir = 'compilation_cache'
  t.max_consecutive_nonfinite = 5
  # Dispatched steps the host may run ahead of the device (e2e_vlp/train/loop.py
  # StepsInFlight): 2 keeps the device fed and bounds how long a preemption signal waits.
  t.max_steps_in_flight = 2
  t.peak_flops = 0.0  # per device; 0 -> not reported (set for MFU, e.g. 1.97e14 for v4)
  t.num_visualize = 4  # eval images drawn with boxes and captions into the workdir
  # LLVM optimisation level of XLA's generated CPU kernels for the train step, on the CPU
  # backend only (GPU/TPU keep XLA's default); -1: XLA's default. base at 1 compiles ~30%
  # faster at the same step time; tiny saw no gain (bench/pretrain_step.py, README).
  t.cpu_backend_optimization_level = -1 if variant == 'tiny' else 1
  # Which XLA:CPU operations run as YNNPACK library calls in the train step, on the CPU
  # backend only: comma-separated from e2e_vlp.train.state.YNN_FUSION_TYPES; '' none;
  # 'default' XLA's choice (dots, convolutions and reductions in jax 0.10). Dots and
  # reductions always: XLA's own reductions split a sum into reduce-windows that ran 7-11x
  # slower (the gradient norm at r50: 79 vs 7 ms; tiny's step 0.86x and base's 0.95x with
  # YNNPACK's). Convolutions stay with XLA: which library is faster depends on the CPU and
  # the width (README "Convolutions by XLA"): YNNPACK's made base's step 0.956x on an AMD
  # EPYC but 1.057x on an Intel Xeon, the r50 DETR step 0.976x and ~1.16x, and the
  # tiny-shaped DETR step 1.42x on the EPYC. XLA's lose at most ~5% on those.
  t.cpu_ynn_fusion_types = 'individual_dot,reduce'

  config.init_from = ''  # a checkpoint dir: load matching parameters, report the rest
  config.workdir = ''  # '' -> workdirs/<task>_<variant>
  config.cache_dir = ''  # '' -> $E2E_VLP_CACHE or ~/.cache/e2e_vlp
  return config
