"""Token reduction: fewer image patches and fewer caption tokens, really dropped, never computed.

Each strategy is registered once, by name: image masks in `image.MASKS` (the recipe's
`reduction.image` choices are `image.IMAGE_STRATEGIES`), caption strategies in `text.TEXT`
(`text.TEXT_STRATEGIES`). Choosing the kept patches and the kept tokens needs no torch and no
model, so the data workers do it (clipa.data.streams); putting the mask into a vision tower is
clipa.model.masking.

Images
  resize   the stage trains at `reduction.image_size` (the model is built for that grid: clipa.model.build)
  random   keep a random subset of patches per sample
  grid     keep a regular sub-grid (stride s, random offset per sample; a checkerboard at 50%)
  block    drop random rectangular blocks of patches (BEiT-style), keep the rest
  none     nothing dropped
Masking happens after patch + position embedding and before the transformer (in open_clip's
`patch_dropout` slot, or a timm ViT's `patch_drop` slot), the class token (and any other prefix
token: timm's register / distillation tokens) is always kept, every sample gets its own mask, and
the kept tokens stay in raster order. Every strategy keeps exactly `int(N * (1 - mask_ratio))`
patches (at least one), so a batch stays a dense tensor and the saved compute is exact.
Masks come from the masker's own generator: re-seeding it with the same value reproduces the
same masks, which exact gradient accumulation needs when it re-forwards a micro-batch.

Texts
  truncate  the first tokens
  random    random tokens, original order kept
  block     a random contiguous span
  syntax    nouns first, then adjectives, then verbs, then the rest, in original order
All keep the start token and end with the end token. open_clip has random/block/syntax
tokenizers too, but they draw from the global RNG (not reproducible per sample) and its syntax
mode downloads NLTK data at run time; clipa's draw from a per-sample seed and tag offline.
"""
