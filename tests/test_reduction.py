import numpy as np
import open_clip
import pytest
import torch

from clipa.model.build import Geometry, build_tokenizer, create_model, stage_config
from clipa.model.masking import install_patch_masker
from clipa.reduction.image import IMAGE_MASKS, keep_count, patch_keep_indices
from clipa.reduction.text import TextReducer

GRIDS = [(4, 4), (7, 7), (14, 14)]
RATIOS = [0.25, 0.3, 0.5, 0.75, 0.9]


@pytest.mark.parametrize("strategy", IMAGE_MASKS)
@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("ratio", RATIOS)
def test_exact_kept_counts_sorted_unique(strategy, grid, ratio):
    n = grid[0] * grid[1]
    for seed in range(5):
        keep = patch_keep_indices(strategy, grid, ratio, np.random.default_rng(seed))
        assert len(keep) == keep_count(n, ratio) == max(1, int(n * (1 - ratio)))
        assert np.all(np.diff(keep) > 0) and keep.min() >= 0 and keep.max() < n


def test_masks_are_deterministic_per_seed_and_differ_across_samples():
    for strategy in IMAGE_MASKS:
        a = patch_keep_indices(strategy, (14, 14), 0.5, np.random.default_rng([3, 7]))
        b = patch_keep_indices(strategy, (14, 14), 0.5, np.random.default_rng([3, 7]))
        c = patch_keep_indices(strategy, (14, 14), 0.5, np.random.default_rng([3, 8]))
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_grid_keeps_a_regular_subgrid():
    for seed in range(10):
        keep = patch_keep_indices("grid", (14, 14), 0.75, np.random.default_rng(seed))
        ys, xs = keep // 14, keep % 14
        assert len(set(ys % 2)) == 1 and len(set(xs % 2)) == 1  # one of every 2x2 cell, same offset
        checker = patch_keep_indices("grid", (14, 14), 0.5, np.random.default_rng(seed))
        assert len(set((checker // 14 + checker % 14) % 2)) == 1  # a checkerboard


def _masked_neighbours(keep, h, w):
    masked = np.ones(h * w, dtype=bool)
    masked[keep] = False
    grid = masked.reshape(h, w)
    pad = np.pad(grid, 1)
    neighbours = pad[:-2, 1:-1].astype(int) + pad[2:, 1:-1] + pad[1:-1, :-2] + pad[1:-1, 2:]
    return neighbours[grid].mean()


def test_block_masks_are_contiguous_compared_to_random():
    block = np.mean([_masked_neighbours(patch_keep_indices("block", (14, 14), 0.5, np.random.default_rng(s)), 14, 14)
                     for s in range(20)])
    rand = np.mean([_masked_neighbours(patch_keep_indices("random", (14, 14), 0.5, np.random.default_rng(s)), 14, 14)
                    for s in range(20)])
    assert block > rand + 0.8, (block, rand)


def test_masked_forward_equals_unmasked_forward_on_the_kept_tokens():
    torch.manual_seed(0)
    model = create_model(stage_config("clipa-tiny", Geometry(64, 32)))
    reference = create_model(stage_config("clipa-tiny", Geometry(64, 32)))
    reference.load_state_dict(model.state_dict())
    masker = install_patch_masker(model, "random", 0.75)
    images = torch.randn(3, 3, 64, 64)
    keep = torch.from_numpy(np.stack([patch_keep_indices("random", (8, 8), 0.75, np.random.default_rng(i))
                                      for i in range(3)]))
    seen = {}
    def record(module, inputs, output):
        seen["tokens"] = inputs[0].shape[1]

    model.visual.transformer.register_forward_hook(record)
    model.train()
    masker.use(keep)
    masked = model.encode_image(images)
    assert seen["tokens"] == 16 + 1  # 16 of 64 patches + class token actually enter the transformer

    v = reference.visual
    x = v.conv1(images).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(3, 1, -1), x], dim=1) + v.positional_embedding
    x = torch.cat([x[:, :1], torch.stack([x[i, 1:][keep[i]] for i in range(3)])], dim=1)
    x = v.transformer(v.ln_pre(x))
    pooled, _ = v._pool(x)
    torch.testing.assert_close(masked, pooled @ v.proj)

    model.eval()  # evaluation sees every patch
    torch.testing.assert_close(model.encode_image(images), reference.encode_image(images))


def test_masking_needs_a_vit():
    model = create_model(stage_config("clipa-tiny", Geometry(64, 32)))
    model.visual = torch.nn.Linear(2, 2)
    from clipa.errors import ClipaError

    with pytest.raises(ClipaError, match='reduction.image: "random" masking needs an open_clip ViT'):
        install_patch_masker(model, "random", 0.5)


CAPTION = "a large striped red triangle at the top left of the picture, next to a small blue circle and a green square"


def body(tokens):
    row = tokens[0].tolist()
    assert row[0] == 49406  # start token
    end = row.index(49407)  # end token
    assert all(t == 0 for t in row[end + 1:])
    return row[1:end]


@pytest.fixture(scope="module")
def bpe():
    return build_tokenizer("clipa-tiny", 32)


def test_truncate_matches_open_clip(bpe):
    reducer = TextReducer(bpe, "truncate", 8)
    assert torch.equal(reducer([CAPTION]), open_clip.SimpleTokenizer(context_length=8)([CAPTION]))
    assert body(reducer([CAPTION])) == bpe.encode(CAPTION)[:6]


def test_random_keeps_order_and_count(bpe):
    full = bpe.encode(CAPTION)
    reducer = TextReducer(bpe, "random", 10)
    kept = body(reducer([CAPTION], rngs=[np.random.default_rng(1)]))
    assert len(kept) == 8
    it = iter(full)
    assert all(token in it for token in kept)  # a subsequence: original order kept
    again = body(reducer([CAPTION], rngs=[np.random.default_rng(1)]))
    other = body(reducer([CAPTION], rngs=[np.random.default_rng(2)]))
    assert kept == again and kept != other


def test_block_keeps_a_contiguous_span(bpe):
    full = bpe.encode(CAPTION)
    reducer = TextReducer(bpe, "block", 10)
    starts = set()
    for seed in range(20):
        kept = body(reducer([CAPTION], rngs=[np.random.default_rng(seed)]))
        assert len(kept) == 8
        assert any(full[i:i + 8] == kept for i in range(len(full) - 7))
        starts.add(next(i for i in range(len(full) - 7) if full[i:i + 8] == kept))
    # The span's start is drawn over the whole caption, not pinned to the beginning (or any one place).
    assert len(starts) >= 5 and max(starts) > 0, starts


@pytest.mark.parametrize("strategy", ["truncate", "random", "block", "syntax"])
def test_short_captions_are_kept_whole(bpe, strategy):
    reducer = TextReducer(bpe, strategy, 16)
    assert body(reducer(["a red circle"], rngs=[np.random.default_rng(0)])) == bpe.encode("a red circle")


def test_syntax_keeps_nouns_then_adjectives_then_verbs_in_original_order(bpe):
    caption = "a man riding a red bicycle down the street"
    # Room for three body tokens: exactly the three nouns survive, in caption order.
    assert bpe.decode(body(TextReducer(bpe, "syntax", 5)([caption]))).split() == ["man", "bicycle", "street"]
    # one more slot: the adjective comes next
    assert bpe.decode(body(TextReducer(bpe, "syntax", 6)([caption]))).split() == ["man", "red", "bicycle", "street"]
    # then the verb, still in original order
    assert bpe.decode(body(TextReducer(bpe, "syntax", 7)([caption]))).split() == [
        "man", "riding", "red", "bicycle", "street"]
    # determiners and prepositions only when everything else fits
    assert "the" not in bpe.decode(body(TextReducer(bpe, "syntax", 9)([caption]))).split()


def test_syntax_skips_a_word_that_does_not_fit_and_keeps_smaller_ones(bpe):
    """A noun of several BPE pieces that no longer fits the budget is skipped whole (never cut), and the
    greedy pass goes on to later, smaller words of the same priority."""
    caption = "a man riding a red velocipede down the street"
    (long_word,) = [w for w in caption.split() if len(bpe.encode(w)) >= 2]
    assert long_word == "velocipede"
    # 2 body tokens: "man" (1), then "velocipede" (>= 2 pieces) does not fit and is skipped, "street" (1) fits.
    assert bpe.decode(body(TextReducer(bpe, "syntax", 4)([caption]))).split() == ["man", "street"]
    # with room for it, the long noun is kept whole, before any adjective
    room = 2 + len(bpe.encode(long_word))
    assert bpe.decode(body(TextReducer(bpe, "syntax", room + 2)([caption]))).split() == ["man", "velocipede", "street"]
