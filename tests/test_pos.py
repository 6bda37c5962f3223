"""clipa.reduction.syntax: offline, context-free word priorities for the "syntax" text reduction."""

import socket
import subprocess
import sys

import pytest

pytest.importorskip("lemminflect")

from clipa.reduction import syntax as pos  # noqa: E402
from clipa.reduction.syntax import ADJ, NOUN, OTHER, VERB, priorities, word_priority  # noqa: E402


def classes(sentence: str) -> dict[str, int]:
    words = sentence.split()
    return dict(zip(words, priorities(words)))


def test_priority_order_constants():
    assert (NOUN, ADJ, VERB, OTHER) == (0, 1, 2, 3)
    assert pos.NAMES[NOUN] == "NOUN" and pos.NAMES[OTHER] == "OTHER"


def test_riding_a_red_bicycle():
    got = classes("a man riding a red bicycle down the street")
    assert got == {"a": OTHER, "man": NOUN, "riding": VERB, "red": ADJ, "bicycle": NOUN,
                   "down": OTHER, "the": OTHER, "street": NOUN}


@pytest.mark.parametrize("sentence, expected", [
    ("two dogs sitting on a wooden bench", [OTHER, NOUN, VERB, OTHER, OTHER, ADJ, NOUN]),
    ("there is a large pizza on the table", [OTHER, OTHER, OTHER, ADJ, NOUN, OTHER, OTHER, NOUN]),
    ("a woman holding an umbrella next to a car", [OTHER, NOUN, VERB, OTHER, NOUN, OTHER, OTHER, OTHER, NOUN]),
    ("a young boy standing in front of a building", [OTHER, ADJ, NOUN, VERB, OTHER, NOUN, OTHER, OTHER, NOUN]),
    ("a cat sleeping on top of a blue car", [OTHER, NOUN, VERB, OTHER, NOUN, OTHER, OTHER, ADJ, NOUN]),
    ("a truck parked near a crowded street", [OTHER, NOUN, VERB, OTHER, OTHER, VERB, NOUN]),
    ("an old kitchen with a living room", [OTHER, ADJ, NOUN, OTHER, OTHER, NOUN, NOUN]),
])
def test_caption_like_sentences(sentence, expected):
    assert priorities(sentence.split()) == expected


def test_plural_nouns():
    for w in ["dogs", "plates", "trees", "buses", "giraffes", "people", "children", "skis"]:
        assert word_priority(w) == NOUN, w


def test_colours_and_gradable_adjectives():
    for w in ["red", "orange", "silver", "white", "small", "tall", "young", "wooden", "colorful"]:
        assert word_priority(w) == ADJ, w


def test_ing_forms_are_verbs_but_not_everyday_ing_nouns():
    for w in ["sitting", "holding", "standing", "flying", "eating", "looking"]:
        assert word_priority(w) == VERB, w
    for w in ["building", "ceiling", "clothing", "wedding"]:
        assert word_priority(w) == NOUN, w


def test_closed_class_words_are_other():
    for w in ["a", "an", "the", "of", "with", "and", "is", "are", "can", "there", "next",
              "it", "their", "some", "each", "two", "twenty", "very", "not"]:
        assert word_priority(w) == OTHER, w


def test_capitalised_and_punctuation_attached():
    assert word_priority("Street.") == NOUN
    assert word_priority("street,") == NOUN
    assert word_priority("MAN") == NOUN
    assert word_priority("(Red)") == ADJ
    assert word_priority("\"Riding\"") == VERB
    assert word_priority("The") == OTHER
    assert word_priority("dog's") == NOUN
    assert word_priority("dog\u2019s") == NOUN
    assert word_priority("French") == ADJ  # capitalised lexicon entry, reached from lowercase too
    assert word_priority("french") == ADJ


def test_clitics_and_punctuation_tokens():
    # open_clip's tokenizer splits "man's" into "man" + "'s" and keeps punctuation as words
    for w in ["'s", "'t", "n't", "'re", ",", ".", "-", "!?", "&"]:
        assert word_priority(w) == OTHER, w


def test_numbers_and_empty():
    for w in ["", " ", "2", "10", "1950s", "3rd", "two"]:
        assert word_priority(w) == OTHER, repr(w)
    assert priorities([]) == []


def test_unknown_words_use_suffixes_else_noun():
    assert word_priority("frisbee") == NOUN
    assert word_priority("Snapple") == NOUN
    assert word_priority("zorblaxful") == ADJ        # -ful
    assert word_priority("blorfishly") == OTHER      # -ly adverb
    assert word_priority("glorpous") == ADJ          # -ous
    assert word_priority("skreebing") == VERB        # -ing
    assert word_priority("snow-covered") == VERB     # last part of a hyphenated word
    assert word_priority("t-shirt") == NOUN


def test_priorities_matches_word_priority():
    words = "A Giraffe, standing next to a tall tree.".split()
    assert priorities(words) == [word_priority(w) for w in words]


def test_deterministic_and_cached():
    words = "a little girl laying on top of a nintendo wii controller".split()
    first = priorities(words)
    word_priority.cache_clear()
    pos._priority_normalized.cache_clear()
    assert priorities(words) == first
    assert priorities(words) == first
    assert word_priority.cache_info().hits >= len(words)


def test_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("clipa.reduction.syntax tried to open a socket")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    word_priority.cache_clear()
    pos._priority_normalized.cache_clear()
    assert priorities("a zebra grazing in a grassy field near zorblax".split()) == [
        OTHER, NOUN, VERB, OTHER, OTHER, ADJ, NOUN, OTHER, NOUN]


def test_import_is_cheap_and_lexicon_loads_offline_in_fresh_process():
    # Fresh interpreter: importing clipa.reduction.syntax loads nothing; the first call loads the lexicon
    # from the installed wheel with sockets disabled, and does not drag spaCy in.
    code = (
        "import socket, sys\n"
        "def refuse(*a, **k): raise OSError('network')\n"
        "socket.socket = refuse; socket.create_connection = refuse\n"
        "import clipa.reduction.syntax as p\n"
        "assert 'lemminflect' not in sys.modules\n"
        "assert p.word_priority('bicycle') == p.NOUN\n"
        "assert 'lemminflect' in sys.modules and 'spacy' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
