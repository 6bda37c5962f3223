"""Offline, context-free part-of-speech priorities for the "syntax" text reduction.

CLIPA's "syntax" reduction keeps a caption's words in priority order (nouns, adjectives, verbs,
everything else) and emits them in their original order; this module gives each word its class:

    NOUN, ADJ, VERB, OTHER = 0, 1, 2, 3      # lower is kept first
    priorities("a man riding a red bicycle".split()) == [3, 0, 2, 3, 1, 0]

The lexicon is lemminflect's (MIT, shipped in its wheel, read offline and lazily on the first
call). The rules, the licences and the measured agreement with spaCy are in docs/syntax_pos.md;
comments below say why each rule is there.
"""

from __future__ import annotations

import functools
import importlib.abc
import sys
import threading

NOUN, ADJ, VERB, OTHER = 0, 1, 2, 3  # priority: lower is kept first
NAMES = ("NOUN", "ADJ", "VERB", "OTHER")

__all__ = ["NOUN", "ADJ", "VERB", "OTHER", "NAMES", "word_priority", "priorities"]

# Closed-class words: determiners, pronouns, prepositions and particles, conjunctions,
# auxiliaries and modals, numbers as words, a few adverbs of degree/negation/place.
_CLOSED = frozenset(
    """
    a an the this that these those some any each every all both either neither no another
    such what whatever which whichever whose
    i me my mine myself you your yours yourself yourselves he him his himself she her hers
    herself it its itself we us our ours ourselves they them their theirs themselves one ones
    someone somebody something anyone anybody anything everyone everybody everything nobody
    nothing who whom whoever
    there here where when whenever wherever why how
    of in on at by for with without within from to into onto upon off out up down over under
    about above across after against along alongside amid among amongst around as atop
    before behind below beneath beside besides between beyond but despite during except
    inside outside near nearby past per since than through throughout till toward towards
    underneath unlike until via versus vs aboard next together apart away
    and or nor so yet if because although though while whereas unless whether
    be am is are was were been being 's 're 'm 've 'd 'll 't
    do does did have has had having
    can could may might must shall should will would ought
    not n't yes also just only even still very too quite rather really almost
    enough again ever never always often sometimes
    zero two three four five six seven eight nine ten eleven twelve thirteen fourteen
    fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy
    eighty ninety hundred thousand million billion dozen
    like well please ok okay oh etc
    """.split()
)

# Colour terms: adjectives in "a red/orange/silver ..." even where the lexicon has no
# comparative for them. A closed, caption-frequent set.
_COLOURS = frozenset(
    """
    red orange yellow green blue purple violet pink brown black white gray grey silver gold
    golden beige tan teal turquoise maroon navy magenta cyan lavender khaki cream ivory
    crimson scarlet bronze copper blond blonde brunette multicolored multicoloured
    colorful colourful
    """.split()
)

# Everyday nouns in -ing that the verb-first rule for -ing forms would otherwise misfile.
_ING_NOUNS = frozenset(
    """
    building buildings ceiling ceilings clothing wedding weddings evening evenings morning
    mornings painting paintings drawing drawings railing railings frosting icing topping
    toppings stuffing filling pudding dumpling dumplings bedding siding lighting ring rings
    thing things king kings wing wings string strings spring springs swing swings sibling
    siblings earring earrings awning awnings seasoning dressing
    living dining parking
    """.split()
)

# Words whose lexicon entry misses the reading captions use: "top" has no noun reading
# ("on top of"), "other"/"many" only a noun one; quantifying adjectives are ADJ (JJ in
# Penn / UD taggers, as in CLIPA's NLTK tagging).
_FIXED = {
    "top": NOUN,
    "other": ADJ, "many": ADJ, "several": ADJ, "few": ADJ, "multiple": ADJ, "various": ADJ,
    "numerous": ADJ, "same": ADJ, "own": ADJ,
}

_ADJ_SUFFIXES = ("ous", "ful", "ive", "al", "ic", "able", "ible", "less", "ish", "ary")
# Adjective-forming suffixes that decide an ungradable adjective/noun pair for the adjective.
_ADJ_SUFFIXES_STRONG = ("al", "ar", "ic", "ive", "ous", "ful", "ant", "ent", "ary", "ory", "ible",
                        "able", "ish", "less", "ian", "ese")
_APOSTROPHES = "'\u2019\u2018`"

_lemminflect = None
_load_lock = threading.Lock()


class _NoSpacy(importlib.abc.MetaPathFinder):
    """Refuses `import spacy` while lemminflect is imported (see _lexicon)."""

    def find_spec(self, name, path=None, target=None):  # noqa: D401
        if name == "spacy" or name.startswith("spacy."):
            raise ImportError("clipa.reduction.syntax: spacy is not needed by lemminflect here")
        return None


def _lexicon():
    """Import lemminflect lazily. Its __init__ imports spaCy when spaCy is installed (to
    register token extensions), which costs seconds and ~2000 modules in every data-loader
    worker; clipa never uses that hook, so spaCy is hidden for that one import unless it
    was already imported."""
    global _lemminflect
    if _lemminflect is None:
        with _load_lock:
            if _lemminflect is None:
                blocker = None
                if "spacy" not in sys.modules:
                    blocker = _NoSpacy()
                    sys.meta_path.insert(0, blocker)
                try:
                    import lemminflect
                except ImportError as err:
                    raise ImportError("clipa.reduction.syntax needs the lemminflect package (its English lexicon "
                                      "ships in the wheel): pip install lemminflect") from err
                finally:
                    if blocker is not None:
                        sys.meta_path.remove(blocker)
                _lemminflect = lemminflect
    return _lemminflect


def _normalize(word: str) -> str:
    w = word.strip().lower()
    for a in _APOSTROPHES[1:]:
        w = w.replace(a, "'")
    if w in _CLOSED:  # clitics like "'s" / "n't" before punctuation is stripped
        return w
    # strip surrounding punctuation (keep inner hyphens/apostrophes: "t-shirt", "o'clock")
    start, end = 0, len(w)
    while start < end and not w[start].isalnum():
        start += 1
    while end > start and not w[end - 1].isalnum():
        end -= 1
    w = w[start:end]
    if w.endswith("'s"):
        w = w[:-2]
    return w


def _gradable(lex, word: str) -> bool:
    return "JJR" in lex.getAllInflections(word, "ADJ")


def _proper_entry(lex, w: str) -> dict:
    """Lexicon entry of the capitalised form ("French": ADJ+NOUN), which the lowercasing
    public look-up cannot reach; lemminflect's own table is read when it is there."""
    try:
        from lemminflect.core.Lemmatizer import Lemmatizer

        return Lemmatizer()._getLemmaDict().get(w[:1].upper() + w[1:]) or {}
    except Exception:  # a future lemminflect without this table: nouns only
        return lex.getAllLemmas(w, "PROPN")


def _suffix_guess(w: str) -> int:
    if w.endswith("ly"):
        return OTHER
    if w.endswith(_ADJ_SUFFIXES):
        return ADJ
    if w.endswith("ing") or w.endswith("ed"):
        return VERB
    return NOUN


@functools.lru_cache(maxsize=1 << 16)
def _priority_normalized(w: str) -> int:
    if not w or not any(c.isalpha() for c in w):
        return OTHER
    if any(c.isdigit() for c in w):
        return OTHER
    if w in _CLOSED:
        return OTHER
    if w in _COLOURS:
        return ADJ
    if w in _ING_NOUNS:
        return NOUN
    if w in _FIXED:
        return _FIXED[w]
    if len(w) == 1:  # stray letters ("x", "s" of a split clitic)
        return OTHER
    lex = _lexicon()
    cats = lex.getAllLemmas(w)
    if not cats:
        proper = _proper_entry(lex, w)
        if proper:  # "French", "Chinese", "Victorian" modify nouns in captions; "Christmas"
            return ADJ if "ADJ" in proper else NOUN
    if not cats and "-" in w:
        parts = [p for p in w.split("-") if p]
        if not parts:
            return OTHER
        last = _priority_normalized(parts[-1])
        return NOUN if last == OTHER else last
    if not cats:
        return _suffix_guess(w)
    if "AUX" in cats and "NOUN" not in cats and "ADJ" not in cats:
        return OTHER
    has_noun = "NOUN" in cats or "PROPN" in cats
    has_adj = "ADJ" in cats
    has_verb = "VERB" in cats
    if has_verb:
        inflected = w not in (lem.lower() for lem in cats["VERB"])
        if w.endswith("ing") and inflected:
            return VERB
        if inflected and not w.endswith("s"):  # past tense / participle
            if has_noun and not w.endswith(("ed", "en")):
                return NOUN  # "stove", "ground": a base noun beats a rare verb's past tense
            return VERB  # participles are VBN, also where the lexicon lists an adjective
    if has_noun and has_adj:
        if _gradable(lex, w):
            return ADJ  # "red"/"redder", "young", "small"
        if not has_verb and w.endswith(_ADJ_SUFFIXES_STRONG):
            return ADJ  # "polar", "commercial", "giant", "plastic"
        return NOUN  # "front", "side", "country", "adult"
    if has_noun:
        return NOUN
    if has_adj:
        return ADJ
    if has_verb:
        return VERB
    return OTHER  # adverb-only (or other closed) words


@functools.lru_cache(maxsize=1 << 17)
def word_priority(word: str) -> int:
    """Priority class of one word: NOUN (0), ADJ (1), VERB (2) or OTHER (3).

    Context-free and deterministic: the same word always gets the same class. Case and
    surrounding punctuation are ignored ("Street." is a noun); a possessive "'s" is dropped;
    empty, punctuation-only and numeric input, and clitics ("'s", "n't"), are OTHER.
    """
    return _priority_normalized(_normalize(word))


def priorities(words: list[str]) -> list[int]:
    """`word_priority` of each word, in order."""
    return [word_priority(w) for w in words]
