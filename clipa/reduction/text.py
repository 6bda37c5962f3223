"""Caption reduction: which tokens each caption keeps, for open_clip's BPE tokenizer and a Hugging Face fast
tokenizer (see clipa.reduction for the strategies).

`TEXT` registers each strategy once: name -> body(vocab, text, budget, rng), the kept token ids between the
special tokens. Adding a strategy is one function and one entry here (plus its test). No torch is imported
until a batch is made (`TextReducer.__call__`), so a data worker reduces captions without the model package.
"""

from __future__ import annotations

import numpy as np

from clipa.errors import ClipaError


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
            raise ClipaError(f"reduction.text: \"{strategy}\" needs open_clip's BPE tokenizer or a Hugging Face fast "
                             f"tokenizer; this model uses {type(tokenizer).__name__}; use reduction.text=\"truncate\"")

    def body(self, text: str, rng: np.random.Generator | None) -> list[int]:
        return TEXT[self.strategy](self.vocab, text, self.length - self.vocab.specials, rng)

    def __call__(self, texts: list[str], rngs=None):
        """A (len(texts), length) LongTensor of token ids."""
        import torch

        if self.strategy == "truncate" and not isinstance(self.vocab, _BPEVocab):
            return self.tokenizer(texts, context_length=self.length)  # the tokenizer's own truncation
        out = torch.full((len(texts), self.length), getattr(self.vocab, "pad", 0), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.vocab.row(self.body(text, rngs[row] if rngs is not None else None))
            out[row, : len(ids)] = torch.tensor(ids)
        return out


def _truncate(vocab, text: str, budget: int, rng) -> list[int]:
    """The first tokens."""
    return vocab.encode(text)[:budget]


def _random(vocab, text: str, budget: int, rng) -> list[int]:
    """Random tokens, original order kept."""
    ids = vocab.encode(text)
    if len(ids) <= budget:
        return ids
    rng = rng if rng is not None else np.random.default_rng()
    keep = np.sort(rng.choice(len(ids), size=budget, replace=False))
    return [ids[i] for i in keep]


def _block(vocab, text: str, budget: int, rng) -> list[int]:
    """A random contiguous span."""
    ids = vocab.encode(text)
    if len(ids) <= budget:
        return ids
    rng = rng if rng is not None else np.random.default_rng()
    start = int(rng.integers(0, len(ids) - budget + 1))
    return ids[start:start + budget]


def _syntax(vocab, text: str, budget: int, rng) -> list[int]:
    """Nouns first, then adjectives, then verbs, then the rest (clipa.reduction.syntax), in original order."""
    from clipa.reduction.syntax import word_priority  # its lexicon loads on the first call

    words, pieces = vocab.words(text)
    if sum(len(p) for p in pieces) <= budget:
        return [i for p in pieces for i in p]
    order = sorted(range(len(words)), key=lambda i: (word_priority(words[i]), i))
    chosen, used = [], 0
    for i in order:  # greedy by priority; a word that does not fit is skipped, smaller ones may
        if used + len(pieces[i]) <= budget:
            chosen.append(i)
            used += len(pieces[i])
    return [t for i in sorted(chosen) for t in pieces[i]]


TEXT = {"truncate": _truncate, "random": _random, "block": _block, "syntax": _syntax}
TEXT_STRATEGIES = tuple(TEXT)  # reduction.text
