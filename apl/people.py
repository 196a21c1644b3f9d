"""Text side of APL training: the people file, prompt templates, caption lists, and prompt-pair composition."""

from __future__ import annotations

import os
import random
import re
import unicodedata
from pathlib import Path

# Prefixes the identity prompts start with (SPEC §4); the empty one lets the name open the prompt.
PREFIXES = ("A photo of ", "A portrait of ", "A close-up photo of ", "A close-up portrait of ", "")

# What the frozen model is pushed towards for identity samples: the attribute description, or the empty prompt
# (one configuration of the original).
ID_TARGETS = ("attributes", "empty")

# Separator between the name (or subject) and a template; the shipped templates continue a sentence
# ("Tom Hanks smiling in a sunny park"), so a plain space reads naturally.
TEMPLATE_SEP = " "

_ARTICLES = ("A", "An", "The")
_INDEXED_LINE = re.compile(r"^(\d+)(?:\s+(.*))?$")


def _read_lines(path: str | os.PathLike[str], what: str) -> list[str]:
    """Read a UTF-8 text file (a BOM is tolerated) into lines, with an error that says what the file is for."""
    path = Path(path)
    if not path.is_file():
        hint = "it is a folder, not a file" if path.is_dir() else "no such file"
        raise FileNotFoundError(f"{what} {path} cannot be read: {hint}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path} is not UTF-8 text ({e}); save it as UTF-8") from e
    return text.splitlines()


def _is_skipped(line: str) -> bool:
    """Blank lines and `#` comments carry no entry."""
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


def load_people(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read `Name<TAB>attribute description` lines (`#` comments allowed) into {name: description}."""
    people: dict[str, str] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(_read_lines(path, "people file"), start=1):
        if _is_skipped(line):
            continue
        where = f"{path}:{lineno}"
        if "\t" not in line:
            raise ValueError(
                f"{where}: expected 'Name<TAB>attribute description' but found no tab in {line.strip()!r}; "
                "names contain spaces, so name and description must be separated by a tab character"
            )
        name, description = (part.strip() for part in line.split("\t", 1))
        name = unicodedata.normalize("NFC", name)
        if not name:
            raise ValueError(f"{where}: the name before the tab is empty")
        if not description:
            raise ValueError(f"{where}: {name!r} has an empty attribute description after the tab")
        if "\t" in description:
            raise ValueError(f"{where}: more than one tab; use exactly one tab between name and description")
        if "/" in name or "\\" in name:
            raise ValueError(f"{where}: name {name!r} contains a slash, which cannot appear in image file names")
        if re.search(rf"(?<!\w){re.escape(name.casefold())}(?!\w)", description.casefold()):  # whole words
            raise ValueError(
                f"{where}: the description of {name!r} contains the name itself; describe attributes only "
                "(the description is the anonymous training target)"
            )
        if name in first_line:
            raise ValueError(f"{where}: {name!r} is listed twice (first on line {first_line[name]}); keep one entry")
        first_line[name] = lineno
        people[name] = description
    if not people:
        raise ValueError(f"people file {path} has no entries; expected lines 'Name<TAB>attribute description'")
    return people


def load_templates(path: str | os.PathLike[str]) -> list[str]:
    """Read one template per line (blank lines and `#` comments skipped)."""
    templates = [line.strip() for line in _read_lines(path, "templates file") if not _is_skipped(line)]
    if not templates:
        raise ValueError(f"templates file {path} has no templates; write one scene/pose/style fragment per line")
    return templates


def load_indexed_prompts(path: str | os.PathLike[str]) -> dict[int, str]:
    """Read a caption file into {index: caption}; empty captions are kept as "" so callers can report them.

    A file whose every entry line starts with a number (`<index> <caption>`, the original `prompts.txt` layout)
    is indexed by that number. Any other file is read as plain captions, indexed by 0-based line number.
    """
    lines = _read_lines(path, "prompts file")
    entries = [(lineno, line.strip()) for lineno, line in enumerate(lines, start=1) if not _is_skipped(line)]
    if not entries:
        raise ValueError(f"prompts file {path} has no captions")
    if not all(_INDEXED_LINE.match(text) for _, text in entries):
        return {lineno - 1: text for lineno, text in entries}
    prompts: dict[int, str] = {}
    index_line: dict[int, int] = {}
    for lineno, text in entries:
        match = _INDEXED_LINE.match(text)
        assert match is not None  # every entry matched above
        index = int(match.group(1))
        if index in prompts:
            raise ValueError(
                f"{path}:{lineno}: index {index} already appeared on line {index_line[index]}; "
                "each '<index> <caption>' line needs its own index"
            )
        index_line[index] = lineno
        prompts[index] = (match.group(2) or "").strip()
    return prompts


def load_prompts(path: str | os.PathLike[str]) -> list[str]:
    """Read captions in file order from `<index> <caption>` lines or plain lines, dropping empty captions."""
    captions = [caption for caption in load_indexed_prompts(path).values() if caption]
    if not captions:
        raise ValueError(f"prompts file {path} has only empty captions")
    return captions


def _split_description(description: str) -> tuple[str, str]:
    """Split "A male person, European descent, blue eyes." into ("A male person", "European descent, blue eyes")."""
    text = description.strip().rstrip(".").strip()
    subject, _, rest = text.partition(",")
    return subject.strip(), rest.strip()


def compose_identity_prompts(
    pre: str, name: str, post: str, description: str, placeholder: str = "alz"
) -> tuple[str, str]:
    """Build the (private, neutral) prompt pair for one identity sample.

    private = f"{placeholder} {pre}{name}{sep}{post}"
    neutral = pre + subject + sep + post + rest
    where `subject` is the description's first clause (its article lower-cased when a prefix precedes it), `rest`
    is ", " + the remaining clauses + "." (just "." when there are none), and `sep` is " " when a template is
    given, else "". Surrounding spaces and trailing ",;." of the template are dropped so clauses join cleanly.
    The name never appears in the neutral prompt. Example with description
    "A male person, European descent, short brown hair, blue eyes.":
        ("A photo of ", "Tom Hanks", "smiling in a sunny park") ->
        private "alz A photo of Tom Hanks smiling in a sunny park"
        neutral "A photo of a male person smiling in a sunny park, European descent, short brown hair, blue eyes."
    """
    if pre and not pre.endswith(" "):
        pre += " "
    post = post.strip().rstrip(",;.").rstrip()
    sep = TEMPLATE_SEP if post else ""
    subject, rest = _split_description(description)
    if not subject:
        raise ValueError(f"the attribute description {description!r} has no subject clause (e.g. 'A male person')")
    first_word, space, remainder = subject.partition(" ")
    if pre and first_word in _ARTICLES:
        subject = first_word.lower() + space + remainder
    tail = f", {rest}." if rest else "."
    lead = f"{placeholder} " if placeholder else ""
    private = f"{lead}{pre}{name}{sep}{post}"
    neutral = f"{pre}{subject}{sep}{post}{tail}"
    return private, neutral


# The original drew the prompt's opening phrase from eight strings, four of them empty: no phrase half the time.
NO_PHRASE_PROB = 0.5


def sample_identity_prompts(
    name: str,
    description: str,
    templates: list[str],
    rng: random.Random,
    placeholder: str = "alz",
    id_target: str = "attributes",
    no_phrase_prob: float = NO_PHRASE_PROB,
) -> tuple[str, str]:
    """Draw an opening phrase (none with probability `no_phrase_prob`, else one of the four of PREFIXES) and a
    template (a random line, or none with probability 0.5)."""
    if id_target not in ID_TARGETS:
        raise ValueError(f"id_target must be one of {ID_TARGETS}, got {id_target!r}")
    pre = "" if rng.random() < no_phrase_prob else rng.choice([p for p in PREFIXES if p])
    post = rng.choice(templates) if templates and rng.random() < 0.5 else ""
    private, neutral = compose_identity_prompts(pre, name, post, description, placeholder)
    return private, ("" if id_target == "empty" else neutral)


def general_prompts(caption: str, placeholder: str = "alz") -> tuple[str, str]:
    """(private, neutral) pair of a general sample: the prefix must leave a non-person caption unchanged."""
    caption = caption.strip()
    lead = f"{placeholder} " if placeholder else ""
    return f"{lead}{caption}", caption
