"""The toy world's cast and captions: named people, anonymous people, scenes, and the words for them.

Captions follow the real pipeline's wording (apl.people): a prefix such as "A photo of " (or none), the person (a
name, or for anonymous people the subject of their description), an optional template, and for anonymous people
the rest of the description. Templates are meaningful in this world: "in a sunny park" draws the park,
"wearing a red shirt" the shirt, and "close-up" prefixes draw a larger face.

The named people's signatures are hidden labels: they are used to draw the model's training pictures and the
reference photos, never by the recogniser that scores generated images.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from apl.io import atomic_write_text
from apl.people import PREFIXES, compose_identity_prompts
from toyworld.render import (
    BACKGROUNDS,
    HAIR,
    MARK_COLOURS,
    MARK_SPOTS,
    PLAIN,
    SHIRTS,
    SKIN,
    Attributes,
    Look,
    Person,
    Scene,
    random_attributes,
    random_person,
    random_scene,
    random_signature,
    render_person,
    render_scene,
)

DATA = Path(__file__).resolve().parent / "data"
PEOPLE_JSON = DATA / "people.json"  # hidden labels: attributes and signatures of the named people
PEOPLE_TSV = DATA / "toy_people.tsv"  # what APL sees: name<TAB>description, as people.tsv
TEMPLATES_TXT = DATA / "toy_templates.txt"
PROMPTS_TXT = DATA / "toy_prompts.txt"  # general captions APL trains on (no person)
PROMPTS_EVAL_TXT = DATA / "toy_prompts_eval.txt"  # other general captions, for evaluation only
PERSON_PROMPTS_TXT = DATA / "toy_person_prompts.txt"  # anonymous-person captions, for evaluation
TEMPLATES_HELDOUT_TXT = DATA / "toy_templates_heldout.txt"  # test_id templates that train.py never uses
GROUP_TSV = {"train": DATA / "toy_people_train.tsv", "held-out": DATA / "toy_people_heldout.tsv"}

# The first sixteen invented names (the original cast; first names mark the gender their hair style shows).
NAMES = (
    ("Anya Brandt", "female"),
    ("Bruno Castell", "male"),
    ("Carla Mendes", "female"),
    ("Dario Kessler", "male"),
    ("Elena Vasquez", "female"),
    ("Felix Moreau", "male"),
    ("Greta Lindqvist", "female"),
    ("Hugo Ferreira", "male"),
    ("Ines Okafor", "female"),
    ("Jonas Weber", "male"),
    ("Kira Tanaka", "female"),
    ("Leon Dubois", "male"),
    ("Maya Rossi", "female"),
    ("Nils Andersen", "male"),
    ("Olga Petrova", "female"),
    ("Pablo Ortega", "male"),
)
# 84 more, for the population-scale cast of 100 (first names paired with surnames by MORE_SEED).
MORE_FEMALE = (
    "Alba", "Bea", "Celia", "Dana", "Edda", "Fiona", "Gala", "Hanna", "Irma", "Jana", "Lara", "Mira", "Nora",
    "Oona", "Petra", "Rosa", "Sara", "Tilda", "Vera", "Wanda", "Yara", "Zora", "Agnes", "Brita", "Clara", "Dora",
    "Eva", "Frida", "Helga", "Iris", "Juna", "Lena", "Marta", "Nina", "Paula", "Ruth", "Selma", "Tara", "Ulla",
    "Vanja", "Alma", "Ebba",
)
MORE_MALE = (
    "Aron", "Boris", "Carlo", "Dirk", "Emil", "Fabio", "Gustav", "Henrik", "Igor", "Jasper", "Karl", "Lars",
    "Marco", "Niko", "Oskar", "Piet", "Rafael", "Sven", "Timo", "Umberto", "Viktor", "Walter", "Xaver", "Yannick",
    "Anton", "Bertil", "Cyril", "Davide", "Erik", "Florian", "Gero", "Hannes", "Ivo", "Joris", "Kai", "Linus",
    "Magnus", "Noah", "Otto", "Quentin", "Rune", "Stefan",
)
SURNAMES = (
    "Abel", "Barros", "Cerny", "Dahl", "Eriksen", "Falk", "Gallo", "Haas", "Ibsen", "Jovanic", "Kaur", "Lindgren",
    "Marini", "Novak", "Olsen", "Pajari", "Quiroga", "Rasmus", "Sorensen", "Tamm", "Urban", "Varga", "Wolff",
    "Yilmaz", "Zeller", "Adler", "Bianchi", "Costa", "Dvorak", "Engel", "Fontaine", "Grimaldi", "Horvat", "Ilic",
    "Jensen", "Kovac", "Lehmann", "Moretti", "Nieminen", "Orlov", "Popescu", "Ramos", "Sandoval", "Toivonen",
    "Ulrich", "Virtanen", "Wagner", "Zamora", "Aalto", "Berger", "Conti", "Delgado", "Eklund", "Fischer", "Galvez",
    "Hartmann", "Iversen", "Janssen", "Kruger", "Larsen", "Mayer", "Nowak", "Ortiz", "Pereira", "Richter",
    "Santos", "Torres", "Vogel", "Winter", "Zimmer", "Acosta", "Brandl", "Castro", "Duarte", "Esposito", "Fuchs",
    "Gomes", "Holm", "Keller", "Lund", "Meyer", "Nilsson", "Pohl", "Roth",
)
MORE_SEED = 20261204
GROUPS = ("train", "held-out")  # the prefix trains on the first group's names; the second is never seen in training
WORLD_SEED = 20261203
SCENE_PREFIXES = ("", "A photo of ", "A picture of ")


def _template_phrases() -> list[str]:
    """Every template: a place, a shirt, or a shirt and a place."""
    shirts = [f"wearing a {c} shirt" for c in SHIRTS]
    places = list(BACKGROUNDS.values())
    rng = random.Random(WORLD_SEED)
    both = [f"{rng.choice(shirts)} {p}" for p in places for _ in range(2)]
    return places + shirts + list(dict.fromkeys(both))


TEMPLATES = _template_phrases()


def heldout_templates() -> list[str]:
    """test_id.py templates ({name}) held out from training: each shirt with a place it is never paired with in
    TEMPLATES (so no training prompt of train.py, nor any caption the toy model saw, has the phrase), behind one of
    the opening phrases."""
    rng = random.Random(WORLD_SEED + 2)
    openers = [p for p in PREFIXES if p]
    out = []
    for i, colour in enumerate(SHIRTS):
        places = [p for p in BACKGROUNDS.values() if f"wearing a {colour} shirt {p}" not in TEMPLATES]
        out.append(f"{openers[i % len(openers)]}{{name}} wearing a {colour} shirt {rng.choice(places)}")
    return out


def parse_template(template: str) -> tuple[str | None, str | None]:
    """(background, shirt) that a template names (None for what it leaves open)."""
    background = next((k for k, phrase in BACKGROUNDS.items() if phrase in template), None)
    shirt = next((c for c in SHIRTS if f"wearing a {c} shirt" in template), None)
    return background, shirt


def make_named_people(seed: int = WORLD_SEED) -> dict[str, Person]:
    """The named cast of 100. The first sixteen (the original cast) keep their draw from `seed`: skin tones and
    hair colours spread evenly, each a distinct mark (place and colour), and Carla and Dario sharing Anya's and
    Bruno's whole descriptions. The other 84 are drawn from MORE_SEED; no two of the 100 share the whole visible
    signature (mark, face paint, headband), and many share a description by chance, so the description alone
    never tells those people apart."""
    rng = random.Random(seed)
    marks = [(spot, colour) for spot in MARK_SPOTS for colour in MARK_COLOURS]
    rng.shuffle(marks)
    skins = [s for _ in range(6) for s in SKIN]
    hairs = [h for _ in range(4) for h in HAIR]
    rng.shuffle(skins)
    rng.shuffle(hairs)
    people: dict[str, Person] = {}
    for i, (name, gender) in enumerate(NAMES):
        attrs = Attributes(gender, skins[i], hairs[i], rng.random() < 0.35, gender == "male" and rng.random() < 0.4)
        if i in (2, 3):  # Carla shares Anya's description, Dario shares Bruno's
            attrs = people[NAMES[i - 2][0]].attributes
        sig = replace(random_signature(rng), mark_spot=marks[i][0], mark_colour=marks[i][1])
        people[name] = Person(attrs, sig)
    more = random.Random(MORE_SEED)
    firsts = [(f, "female") for f in MORE_FEMALE] + [(m, "male") for m in MORE_MALE]
    more.shuffle(firsts)
    seen = {_visible(p.signature) for p in people.values()}
    for (first, gender), surname in zip(firsts, SURNAMES, strict=True):
        attrs = replace(random_attributes(more), gender=gender)
        attrs = replace(attrs, beard=attrs.beard and gender == "male")
        sig = random_signature(more)
        while _visible(sig) in seen:
            sig = random_signature(more)
        seen.add(_visible(sig))
        people[f"{first} {surname}"] = Person(attrs, sig)
    return people


def _visible(sig) -> tuple:
    return sig.mark_spot, sig.mark_colour, sig.pattern, sig.paint if sig.pattern != "none" else None, sig.headband


def split_groups(people: dict[str, Person]) -> dict[str, str]:
    """{name: group}: people who share a whole description always go to the same group (so a group is never
    told apart from the other by a description alone); larger sets of look-alikes first, each to the group with
    fewer people of that gender, in cast order on ties."""
    by_desc: dict[str, list[str]] = {}
    for name, person in people.items():
        by_desc.setdefault(person.attributes.describe(), []).append(name)
    sizes = {(g, s): 0 for g in GROUPS for s in ("female", "male")}
    out: dict[str, str] = {}
    for names in sorted(by_desc.values(), key=lambda ns: -len(ns)):  # stable: cast order within a size
        gender = people[names[0]].attributes.gender  # a description names the gender, so a set has one
        group = min(GROUPS, key=lambda g: (sizes[g, gender], sum(sizes[g, s] for s in ("female", "male"))))
        for n in names:
            out[n] = group
        sizes[group, gender] += len(names)
    return {n: out[n] for n in people}


def load_named_people(path: Path = PEOPLE_JSON, group: str | None = None) -> dict[str, Person]:
    """The named people (hidden labels), all of them or one group's."""
    data = json.loads(path.read_text(encoding="utf-8"))
    return {name: Person.from_dict(d) for name, d in data.items() if group is None or d.get("group") == group}


def load_groups(path: Path = PEOPLE_JSON) -> dict[str, str]:
    return {name: d["group"] for name, d in json.loads(path.read_text(encoding="utf-8")).items()}


# ------------------------------------------------------------------------------------------------------ captions
def named_caption(name: str, rng: random.Random) -> tuple[str, str | None, str | None, bool]:
    """(caption, background, shirt, close-up) of a picture of a named person, as dataset_generation words it."""
    pre = rng.choice(PREFIXES)
    post = rng.choice(TEMPLATES) if rng.random() < 0.5 else ""
    background, shirt = parse_template(post)
    caption = f"{pre}{name}" + (f" {post}" if post else "")
    return caption, background, shirt, "close-up" in pre


def anonymous_caption(attrs: Attributes, rng: random.Random) -> tuple[str, str | None, str | None, bool]:
    """(caption, background, shirt, close-up) of an anonymous person, worded as APL's neutral target prompts;
    sometimes with only some of the description's clauses, so each attribute word is learnt on its own."""
    pre = rng.choice(PREFIXES)
    post = rng.choice(TEMPLATES) if rng.random() < 0.5 else ""
    background, shirt = parse_template(post)
    description = attrs.describe()
    if rng.random() < 0.3:
        subject, *rest = description.rstrip(".").split(", ")
        keep = [c for c in rest if rng.random() < 0.5]
        description = ", ".join([subject, *keep]) + "."
    _, neutral = compose_identity_prompts(pre, "", post, description, placeholder="")
    return neutral, background, shirt, "close-up" in pre


def scene_caption(scene: Scene, rng: random.Random) -> str:
    """'A photo of a red circle in a sunny park', 'An orange star', ..."""
    pre = rng.choice(SCENE_PREFIXES)
    text = scene.describe()
    return pre + (text[0].lower() + text[1:] if pre else text[0].upper() + text[1:])


# ------------------------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One training picture of the toy world with its caption and (for the recogniser) its hidden labels."""

    image: object  # PIL.Image
    caption: str
    kind: str  # "named" | "anonymous" | "scene"
    person: Person | None = None
    identity: str | None = None  # name, or an anonymous id
    look: Look | None = None
    scene: Scene | None = None


def named_sample(name: str, person: Person, rng: random.Random, style: str | None = None) -> Sample:
    caption, background, shirt, closeup = named_caption(name, rng)
    image, look = render_person(person, rng, style or background, shirt, closeup)
    return Sample(image, caption, "named", person, name, look)


def anonymous_sample(rng: random.Random, style: str | None = None) -> Sample:
    person = random_person(rng)
    caption, background, shirt, closeup = anonymous_caption(person.attributes, rng)
    image, look = render_person(person, rng, style or background, shirt, closeup)
    return Sample(image, caption, "anonymous", person, None, look)


def scene_sample(rng: random.Random, style: str | None = None) -> Sample:
    scene = random_scene(rng)
    caption = scene_caption(scene, rng)
    if style is not None:
        scene = Scene(scene.shapes, style)
    return Sample(render_scene(scene, rng), caption, "scene", scene=scene)


def training_sample(
    i: int, people: dict[str, Person], n_named: int, n_anonymous: int, seed: int, style: str | None = None
) -> Sample:
    """Picture i of the model's training set: n_named per named person first, then n_anonymous anonymous people,
    then scenes. Each picture has its own seed, so any part of the set can be drawn alone (in parallel).

    `style` draws the picture on that background instead of the captioned one (the restyled world)."""
    rng = random.Random(f"toy-train/{seed}/{i}")
    names = list(people)
    if i < n_named * len(names):
        name = names[i // n_named]
        return named_sample(name, people[name], rng, style)
    if i < n_named * len(names) + n_anonymous:
        return anonymous_sample(rng, style)
    return scene_sample(rng, style)


def reference_photos(people: dict[str, Person], n: int, seed: int) -> Iterator[tuple[str, int, object]]:
    """(name, k, picture) of n reference photos per named person: the 'real photos' ground truth comes from."""
    rng = random.Random(f"toy-reference/{seed}")
    for name, person in people.items():
        for k in range(n):
            image, _ = render_person(person, rng, background=rng.choice([*BACKGROUNDS, PLAIN]), closeup=True)
            yield name, k, image


# ------------------------------------------------------------------------------------------------- data files
def general_captions(n: int, seed: int, exclude: set[str] = frozenset()) -> list[str]:
    """n distinct scene captions not in `exclude` (APL's general prompts; no person)."""
    rng = random.Random(f"toy-captions/{seed}")
    out: dict[str, None] = {}
    while len(out) < n:
        caption = scene_caption(random_scene(rng), rng)
        if caption not in exclude:
            out[caption] = None
    return list(out)


def person_captions(n: int, seed: int) -> list[str]:
    """n captions of anonymous people (the toy counterpart of prompts_person.txt)."""
    rng = random.Random(f"toy-person-captions/{seed}")
    return [anonymous_caption(random_attributes(rng), rng)[0] for _ in range(n)]


def write_data_files(folder: Path = DATA) -> None:
    """(Re)write the toy world's committed text files from WORLD_SEED."""
    people = make_named_people()
    groups = split_groups(people)
    atomic_write_text(json.dumps({n: {**p.to_dict(), "group": groups[n]} for n, p in people.items()}, indent=1)
                      + "\n", folder / PEOPLE_JSON.name)
    head = (
        "# Toy-world people file (same format as people.tsv): invented names, each with the attribute description\n"
        "# APL turns them into. Written by `python -m toyworld.world`; signatures are in people.json.\n"
    )
    rows = "".join(f"{n}\t{p.attributes.describe()}\n" for n, p in people.items())
    atomic_write_text(head + rows, folder / PEOPLE_TSV.name)
    for group, path in GROUP_TSV.items():
        rows = "".join(f"{n}\t{p.attributes.describe()}\n" for n, p in people.items() if groups[n] == group)
        atomic_write_text(head.replace("invented names,", f"the {group} group's invented names,") + rows,
                          folder / path.name)
    atomic_write_text(
        "# Toy-world test templates held out from training (test_id.py --prompt_templates_file): no training\n"
        "# prompt has these shirt-and-place phrases. Written by `python -m toyworld.world`.\n"
        + "".join(t + "\n" for t in heldout_templates()), folder / TEMPLATES_HELDOUT_TXT.name)
    atomic_write_text(
        "# Toy-world templates: each names a place, a shirt, or both, and the toy model draws what it names.\n"
        + "".join(t + "\n" for t in TEMPLATES),
        folder / TEMPLATES_TXT.name,
    )
    train = general_captions(300, WORLD_SEED)
    held_out = general_captions(100, WORLD_SEED + 1, exclude=set(train))
    atomic_write_text("".join(f"{i} {c}\n" for i, c in enumerate(train)), folder / PROMPTS_TXT.name)
    atomic_write_text("".join(c + "\n" for c in held_out), folder / PROMPTS_EVAL_TXT.name)
    atomic_write_text("".join(c + "\n" for c in person_captions(100, WORLD_SEED)), folder / PERSON_PROMPTS_TXT.name)


if __name__ == "__main__":
    write_data_files()
    print(f"wrote the toy world's files to {DATA}")
