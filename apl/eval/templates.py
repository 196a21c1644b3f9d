"""Identity prompt templates: --prompt_template and the template sets of --prompt_templates_file."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from apl.eval.generation import shipped
from apl.people import PREFIXES
from apl.runtime import UsageError

DEFAULT_SET = "default"  # the template set of --prompt_template


def check_template(template: str, where: str = "--prompt_template") -> None:
    """A template must fill in {name} and nothing else; say so before any model is loaded."""
    braces = "write literal braces as {{ and }}"
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UsageError(f"{where} {template!r} is not a valid template ({err}); {braces}") from err
    extra = list(dict.fromkeys(f for f in fields if f != "name"))
    if extra:
        shown = ", ".join("{" + f + "}" for f in extra)
        raise UsageError(
            f"{where} {template!r} uses {shown}, but only {{name}} is filled in (with each person's "
            f"name); remove the other fields or {braces}"
        )
    if "name" not in fields:
        raise UsageError(f"{where} {template!r} must contain {{name}}")


@dataclass
class TemplateSet:
    """Prompts one evaluation is run on: image k of a person uses templates[k % len(templates)]."""

    name: str
    templates: list[str]
    source: str | None = None  # the file it came from (None for --prompt_template)

    @property
    def training_form(self) -> bool:
        """True when every template is a prefix + name alone, the form train.py draws most often."""
        return bool(self.templates) and all(t in {p + "{name}" for p in PREFIXES} for t in self.templates)


_SET_NAME = re.compile(r"[^\w.-]+")


def load_template_sets(template: str, files: Sequence[str] | None) -> list[TemplateSet]:
    """The default set (--prompt_template) and one set per --prompt_templates_file, each template checked."""
    check_template(template)
    sets = [TemplateSet(DEFAULT_SET, [template])]
    for file in files or []:
        path = Path(shipped(file))
        if not path.is_file():
            raise UsageError(f"--prompt_templates_file {file} does not exist; give a text file of templates with "
                             "{name}, one per line")
        try:
            lines = path.read_text(encoding="utf-8-sig").splitlines()
        except UnicodeDecodeError as err:
            raise UsageError(f"--prompt_templates_file {file} is not UTF-8 text ({err})") from err
        templates = []
        for lineno, line in enumerate(lines, start=1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            check_template(text, f"--prompt_templates_file {file}:{lineno}:")
            templates.append(text)
        templates = list(dict.fromkeys(templates))
        if not templates:
            raise UsageError(f"--prompt_templates_file {file} has no templates (only blank or '#' lines)")
        name = _SET_NAME.sub("_", path.stem).strip("._") or "templates"
        if name in {s.name for s in sets}:
            raise UsageError(f"--prompt_templates_file {file}: a template set named {name!r} already exists (sets are "
                             f"named by file name, and {DEFAULT_SET!r} is --prompt_template's); rename the file")
        sets.append(TemplateSet(name, templates, str(file)))
    return sets
