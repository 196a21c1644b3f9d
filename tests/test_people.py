"""People file, templates, caption lists, and (private, neutral) prompt composition."""

from __future__ import annotations

import random
import re
from collections import Counter
from pathlib import Path

import pytest

from apl.people import (
    PREFIXES,
    compose_identity_prompts,
    general_prompts,
    load_indexed_prompts,
    load_people,
    load_prompts,
    load_templates,
    sample_identity_prompts,
)

ROOT = Path(__file__).resolve().parents[1]
DESC = "A male person, European descent, short brown hair, blue eyes."
# Words that would make a "general" caption a person caption, which the prefix must not change.
PERSON_WORDS = re.compile(
    r"\b(man|men|woman|women|person|people|boy|girl|child|children|kid|crowd|portrait|face|he|she|his|her)\b",
    re.IGNORECASE,
)


# --- shipped files -------------------------------------------------------------------------------------------


def test_shipped_people_file():
    people = load_people(ROOT / "people.tsv")
    assert len(people) >= 90
    for name, desc in people.items():
        assert desc.endswith("."), name
        subject = desc.split(",")[0]
        assert re.fullmatch(r"An? (elderly |young )?(male|female) person", subject), (name, subject)
        assert name.casefold() not in desc.casefold()
    # both genders and several descents are represented
    subjects = Counter("female" in d.split(",")[0] for d in people.values())
    assert subjects[True] >= 30 and subjects[False] >= 30
    descents = {re.search(r", ([^,]*descent)", d).group(1) for d in people.values()}
    assert len(descents) >= 6


def test_shipped_templates():
    templates = load_templates(ROOT / "templates.txt")
    assert 90 <= len(templates) <= 150
    assert len(set(templates)) == len(templates)
    for t in templates:
        assert t == t.strip() and not t.endswith(".") and t[0].islower(), t


def test_shipped_prompts_are_indexed_non_person_captions():
    path = ROOT / "prompts.txt"
    indexed = load_indexed_prompts(path)
    assert len(indexed) >= 300
    # original layout: line i is "<i> <caption>"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(line.startswith(f"{i} ") for i, line in enumerate(lines))
    assert sorted(indexed) == list(range(len(lines)))
    captions = load_prompts(path)
    assert len(captions) == len(indexed) and len(set(captions)) == len(captions)
    names = [n.casefold() for n in load_people(ROOT / "people.tsv")]
    for caption in captions:
        assert not any(n in caption.casefold() for n in names), caption
        assert not PERSON_WORDS.search(caption), caption


def test_shipped_person_prompts():
    prompts = load_prompts(ROOT / "prompts_person.txt")
    assert 90 <= len(prompts) <= 150
    roles = re.compile(
        r"\b(chef|player|skateboarder|snowboarder|doctor|nurse|waiter|farmer|student|teenager|couple|"
        r"bride|officer|worker|businesswoman|family|friends|children)\b",
        re.IGNORECASE,
    )
    assert all(PERSON_WORDS.search(p) or roles.search(p) for p in prompts)
    names = [n.casefold() for n in load_people(ROOT / "people.tsv")]
    assert not any(n in p.casefold() for p in prompts for n in names)


# --- loaders -------------------------------------------------------------------------------------------------


def test_load_people_comments_and_bom(tmp_path):
    f = tmp_path / "p.tsv"
    f.write_text(
        "\ufeff# comment\n\nAda Lovelace\tA female person, European descent.\n  \nBob Example\tA male person.\n",
        encoding="utf-8",
    )
    assert load_people(f) == {"Ada Lovelace": "A female person, European descent.", "Bob Example": "A male person."}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Ada Lovelace A female person.\n", r"p\.tsv:1: .*no tab"),
        ("# c\nAda Lovelace\tA female person.\nAda Lovelace\tA female person.\n", r"p\.tsv:3: .*listed twice.*line 2"),
        ("\tA female person.\n", r"p\.tsv:1: the name .* is empty"),
        ("Ada Lovelace\t   \n", r"p\.tsv:1: 'Ada Lovelace' has an empty attribute description"),
        ("Ada Lovelace\tA female person who looks like Ada Lovelace.\n", r"p\.tsv:1: .*contains the name"),
        ("AC/DC\tA male person.\n", r"p\.tsv:1: .*slash"),
        ("# only a comment\n\n", r"no entries"),
    ],
)
def test_load_people_errors(tmp_path, text, message):
    f = tmp_path / "p.tsv"
    f.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_people(f)


def test_name_check_matches_whole_words(tmp_path):
    """'Al' is not inside 'male': only the name as a word of its own is refused in a description."""
    f = tmp_path / "p.tsv"
    f.write_text("Al\tA male person, short hair.\nPink\tA female person, pinkish hair.\n", encoding="utf-8")
    assert set(load_people(f)) == {"Al", "Pink"}
    f.write_text("Al\tA male person like Al, short hair.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="contains the name"):
        load_people(f)


def test_load_people_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"people file .*nope\.tsv"):
        load_people(tmp_path / "nope.tsv")


def test_load_templates(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("# c\nsmiling\n\n  in a park  \n", encoding="utf-8")
    assert load_templates(f) == ["smiling", "in a park"]
    f.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no templates"):
        load_templates(f)


def test_load_prompts_indexed_and_plain(tmp_path):
    indexed = tmp_path / "i.txt"
    indexed.write_text("2 a red car\n0 a blue boat\n1\n", encoding="utf-8")
    assert load_indexed_prompts(indexed) == {2: "a red car", 0: "a blue boat", 1: ""}
    assert load_prompts(indexed) == ["a red car", "a blue boat"]
    plain = tmp_path / "p.txt"
    plain.write_text("a red car\n3 dogs on a beach\n\na blue boat\n", encoding="utf-8")
    assert load_indexed_prompts(plain) == {0: "a red car", 1: "3 dogs on a beach", 3: "a blue boat"}
    assert load_prompts(plain) == ["a red car", "3 dogs on a beach", "a blue boat"]
    dup = tmp_path / "d.txt"
    dup.write_text("0 a\n1 b\n0 c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"d\.txt:3: index 0 already appeared on line 1"):
        load_indexed_prompts(dup)


# --- composition ---------------------------------------------------------------------------------------------


def test_compose_with_prefix_and_template():
    private, neutral = compose_identity_prompts("A photo of ", "Tom Hanks", "smiling in a sunny park", DESC)
    assert private == "alz A photo of Tom Hanks smiling in a sunny park"
    assert (
        neutral == "A photo of a male person smiling in a sunny park, European descent, short brown hair, blue eyes."
    )


def test_compose_empty_prefix_keeps_capital_and_empty_template():
    private, neutral = compose_identity_prompts("", "Tom Hanks", "", DESC)
    assert private == "alz Tom Hanks"
    assert neutral == DESC
    private, neutral = compose_identity_prompts("", "Tom Hanks", "wearing a black suit, studio lighting", DESC)
    assert private == "alz Tom Hanks wearing a black suit, studio lighting"
    assert neutral == (
        "A male person wearing a black suit, studio lighting, European descent, short brown hair, blue eyes."
    )


def test_compose_article_an_single_clause_and_template_punctuation():
    _, neutral = compose_identity_prompts("A portrait of ", "X Y", "", "An elderly female person, grey hair.")
    assert neutral == "A portrait of an elderly female person, grey hair."
    _, neutral = compose_identity_prompts("A close-up photo of", "X Y", " laughing. ", "A female person")
    assert neutral == "A close-up photo of a female person laughing."
    private, _ = compose_identity_prompts("A photo of ", "X Y", "laughing", "A female person.", placeholder="")
    assert private == "A photo of X Y laughing"


@pytest.mark.parametrize("pre", PREFIXES)
def test_name_never_in_neutral(pre):
    people = load_people(ROOT / "people.tsv")
    templates = load_templates(ROOT / "templates.txt")
    for name, desc in people.items():
        for post in ("", templates[0], templates[-1]):
            private, neutral = compose_identity_prompts(pre, name, post, desc)
            assert name in private and private.startswith("alz ")
            assert name.casefold() not in neutral.casefold()
            assert neutral.endswith(".") and neutral.startswith(pre)


def test_sample_identity_prompts_distribution():
    templates = ["in a park", "at night"]
    rng = random.Random(0)
    pres, with_post = Counter(), 0
    n = 2000
    for _ in range(n):
        private, neutral = sample_identity_prompts("Tom Hanks", DESC, templates, rng)
        rest = private.removeprefix("alz ")
        pre = rest.split("Tom Hanks")[0]
        pres[pre] += 1
        with_post += rest.endswith(("in a park", "at night"))
        assert neutral.startswith(pre)
    assert set(pres) == set(PREFIXES)
    # No opening phrase half the time (the original's four empty strings of eight), else one of the four phrases.
    assert abs(pres[""] / n - 0.5) < 0.04
    assert all(abs(c / n - 0.5 / (len(PREFIXES) - 1)) < 0.04 for p, c in pres.items() if p)
    assert abs(with_post / n - 0.5) < 0.05
    # same seed, same prompts
    a = [sample_identity_prompts("Tom Hanks", DESC, templates, random.Random(7)) for _ in range(3)]
    b = [sample_identity_prompts("Tom Hanks", DESC, templates, random.Random(7)) for _ in range(3)]
    assert a == b


def test_sample_identity_prompts_empty_target():
    rng = random.Random(1)
    for _ in range(20):
        private, neutral = sample_identity_prompts("Tom Hanks", DESC, ["in a park"], rng, id_target="empty")
        assert neutral == "" and "Tom Hanks" in private
    with pytest.raises(ValueError, match="id_target"):
        sample_identity_prompts("Tom Hanks", DESC, [], rng, id_target="blank")
    # no templates: never a post
    assert all(sample_identity_prompts("T H", DESC, [], rng)[0].endswith("T H") for _ in range(20))


def test_general_prompts():
    assert general_prompts(" A red car on a road ") == ("alz A red car on a road", "A red car on a road")
    assert general_prompts("A boat", placeholder="sks") == ("sks A boat", "A boat")
