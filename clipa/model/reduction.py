"""Token reduction: fewer image patches and fewer caption tokens, really dropped, never computed.

Images
  resize   the stage trains at `reduction.image_size` (the model is built for that grid), see model.py
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

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

IMAGE_MASKS = ("random", "grid", "block")


def keep_count(num_patches: int, mask_ratio: float) -> int:
    return max(1, int(num_patches * (1.0 - mask_ratio)))


# --------------------------------------------------------------------------- image masks


def _grid_scores(h: int, w: int, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    keep_fraction = 1.0 - mask_ratio
    stride = max(1, int(round(1.0 / math.sqrt(keep_fraction))))
    ys, xs = np.mgrid[0:h, 0:w]
    if stride == 1 and keep_fraction <= 0.5 + 1e-6:
        on_grid = (ys + xs + rng.integers(2)) % 2 == 0  # checkerboard
    else:
        oy, ox = rng.integers(stride, size=2)
        on_grid = ((ys - oy) % stride == 0) & ((xs - ox) % stride == 0)
    # On-grid patches first; ties (too many or too few on the grid) are broken at random.
    return on_grid.ravel() * 2.0 + rng.random(h * w)


def _block_scores(h: int, w: int, mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    n = h * w
    target = n - keep_count(n, mask_ratio)
    masked = np.zeros((h, w), dtype=bool)
    for _ in range(32):
        if masked.sum() >= target:
            break
        area = rng.uniform(0.1, 0.4) * n
        aspect = math.exp(rng.uniform(-1, 1) * math.log(3.3))
        bh = int(min(h, max(1, round(math.sqrt(area * aspect)))))
        bw = int(min(w, max(1, round(math.sqrt(area / aspect)))))
        top, left = rng.integers(h - bh + 1), rng.integers(w - bw + 1)
        masked[top:top + bh, left:left + bw] = True
    # Unmasked patches first; the exact count is then made up at random within each group.
    return (~masked).ravel() * 2.0 + rng.random(n)


def patch_keep_indices(strategy: str, grid: tuple[int, int], mask_ratio: float, rng: np.random.Generator) -> np.ndarray:
    """Indices of the patches one sample keeps, sorted (raster order preserved)."""
    h, w = grid
    n = h * w
    if strategy == "random":
        scores = rng.random(n)
    elif strategy == "grid":
        scores = _grid_scores(h, w, mask_ratio, rng)
    elif strategy == "block":
        scores = _block_scores(h, w, mask_ratio, rng)
    else:
        raise ValueError(f"unknown image mask strategy {strategy!r}")
    keep = keep_count(n, mask_ratio)
    return np.sort(np.argpartition(-scores, keep - 1)[:keep])


class PatchMasker(nn.Module):
    """Drops patch tokens after position embedding; sits in open_clip's `patch_dropout` slot.

    The data loader draws each sample's mask (from that sample's own seed, in the loader
    workers, off the training step's critical path) and the trainer hands the batch's indices
    over with `use(keep)` before the forward. Re-forwarding the same micro-batch with the same
    indices therefore sees the same tokens, as exact gradient accumulation requires.
    """

    def __init__(self, strategy: str, mask_ratio: float, grid: tuple[int, int], prefix_tokens: int = 1):
        super().__init__()
        self.strategy, self.mask_ratio, self.grid = strategy, mask_ratio, tuple(grid)
        self.prefix_tokens = prefix_tokens  # class/register tokens ahead of the patches, always kept
        self.keep: torch.Tensor | None = None

    def use(self, keep: torch.Tensor | None) -> None:
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.mask_ratio == 0.0:
            return x  # evaluation always sees every patch, as in CLIPA
        if self.keep is None:
            raise RuntimeError("PatchMasker: call use(keep_indices) before a training forward")
        if self.keep.shape[0] != x.shape[0]:
            raise RuntimeError(f"PatchMasker: {self.keep.shape[0]} masks for a batch of {x.shape[0]}")
        prefix, patches = x[:, :self.prefix_tokens], x[:, self.prefix_tokens:]
        index = self.keep.to(x.device).unsqueeze(-1).expand(-1, -1, patches.shape[-1])
        return torch.cat([prefix, torch.gather(patches, 1, index)], dim=1)


def image_grid(model_cfg: dict, image_size: int) -> tuple[int, int] | None:
    patch = model_cfg["vision_cfg"].get("patch_size")
    return (image_size // patch, image_size // patch) if patch else None


def timm_patch_slot(trunk: nn.Module | None) -> bool:
    """Whether a timm trunk has the ViT token path masking needs: patch_embed -> _pos_embed ->
    patch_drop -> norm_pre -> blocks (timm's VisionTransformer and its subclasses such as DeiT).
    Other timm families (ResNet, ConvNeXt, EVA with its index-returning patch_drop...) have no slot
    a plain token mask fits."""
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(trunk, VisionTransformer) and not getattr(trunk, "dynamic_img_size", False)


def install_patch_masker(model: nn.Module, strategy: str, mask_ratio: float) -> PatchMasker | None:
    """Put a PatchMasker into the model's vision tower; None when nothing is masked."""
    if strategy not in IMAGE_MASKS or mask_ratio == 0.0:
        return None
    visual = model.visual
    if hasattr(visual, "patch_dropout") and hasattr(visual, "grid_size"):  # open_clip's own ViT
        masker = PatchMasker(strategy, mask_ratio, visual.grid_size)
        visual.patch_dropout = masker
        return masker
    trunk = getattr(visual, "trunk", None)  # open_clip's TimmModel adapter
    if timm_patch_slot(trunk):
        # After the position embedding, so kept patches carry their own positions; timm puts the
        # class and register tokens first (`num_prefix_tokens`), and they are always kept.
        masker = PatchMasker(strategy, mask_ratio, trunk.patch_embed.grid_size, trunk.num_prefix_tokens)
        trunk.patch_drop = masker
        return masker
    from clipa.errors import ClipaError

    if trunk is not None:
        name = getattr(trunk, "pretrained_cfg", {}).get("architecture") or type(trunk).__name__
        raise ClipaError(f"reduction.image: \"{strategy}\" masking needs a ViT image tower with patch tokens; timm model "
                         f"\"{name}\" ({type(trunk).__name__}) has none to drop; use reduction.image=\"resize\" "
                         "(a smaller reduction.image_size) to reduce its tokens")
    raise ClipaError(f"reduction.image: \"{strategy}\" masking needs an open_clip ViT image tower; "
                     f"{type(visual).__name__} has no patch tokens to drop; use reduction.image=\"resize\"")


# --------------------------------------------------------------------------- text


class _BPEVocab:
    """open_clip's SimpleTokenizer (OpenAI BPE): rows are <start> body <end>, zero-padded."""

    def __init__(self, tok):
        self.tok = tok
        self.specials = 2

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def words(self, text: str) -> tuple[list[str], list[list[int]]]:
        tok = self.tok
        words = tok.pat.findall(tok.clean_fn(text))
        pieces = []
        for word in words:
            token = "".join(tok.byte_encoder[b] for b in word.encode("utf-8"))
            pieces.append([tok.encoder[p] for p in tok.bpe(token).split(" ")])
        return words, pieces

    def row(self, body: list[int]) -> list[int]:
        return [self.tok.sot_token_id, *body, self.tok.eot_token_id]


class _HFVocab:
    """open_clip's HFTokenizer (CLIPA-v2's BERT): rows are built by the Hugging Face tokenizer's own
    special-token rule ([CLS] body [SEP] for BERT), padded with its pad id, [SEP] zeroed when the
    model config strips it, exactly as HFTokenizer does for a caption it truncates."""

    def __init__(self, tok):
        self.tok, self.hf = tok, tok.tokenizer
        # The tokenizer's single-sequence template ([CLS] $A [SEP] for BERT), read off a probe word:
        # works across transformers versions and tokenizer families.
        body = self.hf("a", add_special_tokens=False)["input_ids"]
        full = self.hf("a", add_special_tokens=True)["input_ids"]
        at = next(i for i in range(len(full)) if full[i:i + len(body)] == body)
        self.prefix, self.suffix = full[:at], full[at + len(body):]
        self.specials = len(self.prefix) + len(self.suffix)

    def encode(self, text: str) -> list[int]:
        return self.hf(self.tok.clean_fn(text), add_special_tokens=False)["input_ids"]

    def words(self, text: str) -> tuple[list[str], list[list[int]]]:
        cleaned = self.tok.clean_fn(text)
        encoding = self.hf(cleaned, add_special_tokens=False)
        words, pieces, last = [], [], None
        for token, word in zip(encoding["input_ids"], encoding.word_ids()):
            if word != last:  # the fast tokenizer's pre-tokenized word (whitespace and punctuation split)
                start, end = encoding.word_to_chars(word)
                words.append(cleaned[start:end])
                pieces.append([])
                last = word
            pieces[-1].append(token)
        return words, pieces

    def row(self, body: list[int]) -> list[int]:
        ids = [*self.prefix, *body, *self.suffix]
        if self.tok.strip_sep_token:
            ids = [0 if i == self.hf.sep_token_id else i for i in ids]
        return ids

    @property
    def pad(self) -> int:
        return self.hf.pad_token_id or 0


def _vocab(tokenizer):
    if hasattr(tokenizer, "bpe") and hasattr(tokenizer, "sot_token_id"):
        return _BPEVocab(tokenizer)
    hf = getattr(tokenizer, "tokenizer", None)  # open_clip.HFTokenizer wraps a transformers tokenizer
    if getattr(hf, "is_fast", False) and not getattr(tokenizer, "tokenizer_mode", ""):
        return _HFVocab(tokenizer)
    return None  # anything else can only truncate, by itself


class TextReducer:
    """Tokenize captions to `length` tokens (specials + kept body), dropping by strategy.

    Works with open_clip's BPE tokenizer and with its Hugging Face tokenizer (CLIPA-v2's BERT, a
    fast tokenizer is needed for word boundaries). `rngs` (one numpy Generator per caption) make
    random/block choices a function of the sample, not of the process or worker that tokenizes it.
    """

    def __init__(self, tokenizer, strategy: str, length: int):
        self.tokenizer, self.strategy, self.length = tokenizer, strategy, length
        self.vocab = _vocab(tokenizer)
        if strategy != "truncate" and self.vocab is None:
            from clipa.errors import ClipaError

            raise ClipaError(f"reduction.text: \"{strategy}\" needs open_clip's BPE tokenizer or a Hugging Face fast "
                             f"tokenizer; this model uses {type(tokenizer).__name__}; use reduction.text=\"truncate\"")
        if strategy == "syntax":
            from clipa.model.pos import word_priority

            self.word_priority = word_priority

    def body(self, text: str, rng: np.random.Generator | None) -> list[int]:
        budget = self.length - self.vocab.specials
        if self.strategy == "syntax":
            return self._syntax(text, budget)
        ids = self.vocab.encode(text)
        if len(ids) <= budget:
            return ids
        if self.strategy == "truncate":
            return ids[:budget]
        rng = rng if rng is not None else np.random.default_rng()
        if self.strategy == "random":
            keep = np.sort(rng.choice(len(ids), size=budget, replace=False))
            return [ids[i] for i in keep]
        if self.strategy == "block":
            start = int(rng.integers(0, len(ids) - budget + 1))
            return ids[start:start + budget]
        raise ValueError(self.strategy)

    def _syntax(self, text: str, budget: int) -> list[int]:
        words, pieces = self.vocab.words(text)
        if sum(len(p) for p in pieces) <= budget:
            return [i for p in pieces for i in p]
        order = sorted(range(len(words)), key=lambda i: (self.word_priority(words[i]), i))
        chosen, used = [], 0
        for i in order:  # greedy by priority; a word that does not fit is skipped, smaller ones may
            if used + len(pieces[i]) <= budget:
                chosen.append(i)
                used += len(pieces[i])
        return [t for i in sorted(chosen) for t in pieces[i]]

    def __call__(self, texts: list[str], rngs=None) -> torch.Tensor:
        if self.strategy == "truncate" and not isinstance(self.vocab, _BPEVocab):
            return self.tokenizer(texts, context_length=self.length)  # the tokenizer's own truncation
        out = torch.full((len(texts), self.length), getattr(self.vocab, "pad", 0), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.vocab.row(self.body(text, rngs[row] if rngs is not None else None))
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def reduce_batch(captions: list[str], rngs: list, text_reducer, mask) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A micro-batch's token reduction: caption tokens and kept-patch indices, from per-sample generators."""
    texts = text_reducer(captions, rngs=rngs)
    keep = None
    if mask is not None:
        strategy, grid, ratio = mask
        keep = torch.from_numpy(np.stack([patch_keep_indices(strategy, grid, ratio, rng) for rng in rngs]))
    return texts, keep
