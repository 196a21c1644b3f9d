"""Plug-in face backends and FID features named as 'package.module:attribute' on the command line."""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from apl.eval.faces import Face, make_backend
from apl.eval.run_id import backend_threshold
from apl.plugins import PluginError, call_with_accepted, is_plugin_spec, load_plugin
from args.clip_args import build_parser


class FakeBackend:
    """A backend that finds one face whose embedding is the image's mean colour."""

    name = "fake"
    embedding_dim = 3

    def __init__(self, det_thresh: float = 0.5) -> None:
        self.det_thresh = det_thresh
        self.default_id_threshold = 0.77

    def faces(self, image_rgb: np.ndarray) -> list[Face]:
        v = image_rgb.reshape(-1, 3).mean(0).astype(np.float32) + 1
        return [Face(np.zeros(4, np.float32), 1.0, v / np.linalg.norm(v))]

    def embed(self, image_rgb: np.ndarray) -> np.ndarray | None:
        return self.faces(image_rgb)[0].embedding


class NotABackend:
    def __init__(self) -> None:
        self.name = "nope"


def test_plugin_specs_are_recognised():
    assert is_plugin_spec("toyworld.perception:ToyFaceBackend")
    assert is_plugin_spec("test_plugins:FakeBackend")
    for bad in ("insightface", "a.b", ":X", "a:b:c", "a b:C", "a:1x", "../x:y"):
        assert not is_plugin_spec(bad), bad


def test_plugin_backend_is_built_with_the_arguments_it_accepts():
    backend = make_backend("test_plugins:FakeBackend", det_thresh=0.3, device="cpu", det_size=256)
    assert isinstance(backend, FakeBackend) and backend.det_thresh == 0.3
    assert backend_threshold(backend) == 0.77  # its own threshold wins over the built-in table


def test_builtin_backends_keep_their_thresholds():
    class Named:
        name = "dlib"

    assert backend_threshold(Named()) == 0.91


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:Thing", "cannot import no_such_module_xyz"),
        ("test_plugins:Missing", "has no attribute 'Missing'"),
        ("test_plugins:argparse", "not a class or function"),
        ("test_plugins:NotABackend", "lacks embedding_dim, faces, embed"),
    ],
)
def test_bad_plugins_say_what_is_wrong(spec, message):
    with pytest.raises(PluginError, match=message) as err:
        make_backend(spec)
    assert "--face_backend" in str(err.value)


def test_load_plugin_refuses_a_malformed_spec():
    with pytest.raises(PluginError, match="package.module:attribute"):
        load_plugin("just-a-name", "--fid_feature")


def test_call_with_accepted_drops_unknown_keywords():
    assert call_with_accepted(lambda a, b=2: a + b, a=1, c=5) == 3
    assert call_with_accepted(lambda **kw: sorted(kw), a=1, c=5) == ["a", "c"]


def test_parser_accepts_plugins_and_refuses_other_names():
    p = build_parser("x")
    args = p.parse_args(["--face_backend", "pkg.mod:Cls", "--fid_feature", "pkg.mod:feats"])
    assert (args.face_backend, args.fid_feature) == ("pkg.mod:Cls", "pkg.mod:feats")
    assert p.parse_args([]).fid_feature == "inception"
    for flag, value in (("--face_backend", "facenet"), ("--fid_feature", "clip")):
        with pytest.raises(SystemExit):
            p.parse_args([flag, value])
    assert isinstance(p, argparse.ArgumentParser)
