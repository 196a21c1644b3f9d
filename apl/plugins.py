"""Plug-ins named on the command line as `package.module:attribute` (a face backend, an FID feature extractor).

The evaluation scripts know InsightFace, dlib and Inception by name; anything else (your own recogniser, the toy
world's test-bed recogniser) is given as an import path, e.g. `--face_backend toyworld.perception:ToyFaceBackend`.
The module is imported only when such a value is given, from the working folder or the installed packages: a
plug-in is code you choose to run, like a script you pass on the command line.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable
from typing import Any

_SPEC = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


class PluginError(ValueError):
    """A plug-in spec that cannot be loaded; the message says which flag, what went wrong and what to do."""


def is_plugin_spec(value: str) -> bool:
    """True for 'package.module:attribute'."""
    return bool(_SPEC.match(value))


def load_plugin(spec: str, flag: str) -> Callable[..., Any]:
    """The callable named by `spec` ('package.module:attribute'), or a PluginError naming `flag`."""
    if not is_plugin_spec(spec):
        raise PluginError(f"{flag} {spec!r}: expected a built-in name or 'package.module:attribute'")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise PluginError(
            f"{flag} {spec!r}: cannot import {module_name} ({err}); run from the folder that holds it or install it"
        ) from err
    if not hasattr(module, attr):
        raise PluginError(f"{flag} {spec!r}: {module_name} has no attribute {attr!r}")
    target = getattr(module, attr)
    if not callable(target):
        raise PluginError(f"{flag} {spec!r}: {module_name}.{attr} is not a class or function")
    return target


def call_with_accepted(factory: Callable[..., Any], **kwargs: Any) -> Any:
    """factory(**the kwargs its signature accepts); the rest are dropped (plug-ins need not take every flag)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return factory(**kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return factory(**kwargs)
    return factory(**{k: v for k, v in kwargs.items() if k in params})
