"""Face backends on the real photos shipped with insightface: tiny ONNX stand-ins through FaceAnalysis, and dlib."""

from __future__ import annotations

import numpy as np
import pytest
from eval_stand_ins import GROUP_PHOTO, TOM_HANKS, tiny_arcface, write_tiny_insightface_pack

from apl.eval.faces import (
    DlibBackend,
    ImageReadError,
    InsightFaceBackend,
    InsightFacePackMissing,
    load_image_rgb,
    make_backend,
)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("insightface_home")
    write_tiny_insightface_pack(root, pack="tiny_pack")
    return root


@pytest.fixture(scope="module")
def tiny_backend(tiny_root):
    return make_backend("insightface", pack="tiny_pack", root=str(tiny_root), det_thresh=0.5, det_size=256)


@pytest.fixture(scope="module")
def photos():
    return load_image_rgb(TOM_HANKS), load_image_rgb(GROUP_PHOTO)


def test_insightface_tiny_pack_finds_and_embeds_faces(tiny_backend, photos):
    tom, group = photos
    faces = tiny_backend.faces(tom)
    assert len(faces) == 1
    face = faces[0]
    assert face.bbox.shape == (4,) and face.det_score >= 0.5
    # The stand-in detector's box covers the whole 112x112 crop.
    np.testing.assert_allclose(face.bbox, [0, 0, 112, 112], atol=1e-3)
    emb = tiny_backend.embed(tom)
    assert emb.shape == (512,) and emb.dtype == np.float32
    assert abs(np.linalg.norm(emb) - 1.0) < 1e-5
    np.testing.assert_array_equal(emb, face.embedding)
    other = tiny_backend.embed(group)
    assert other is not None and float(emb @ other) < 0.9


def test_insightface_embedding_is_deterministic_and_depends_on_pixels(tiny_root, tiny_backend, photos):
    tom, _ = photos
    again = InsightFaceBackend(pack=str(tiny_root / "models" / "tiny_pack"))  # pack given as a folder path
    np.testing.assert_array_equal(again.embed(tom), tiny_backend.embed(tom))
    mirrored = tiny_backend.embed(np.ascontiguousarray(tom[:, ::-1]))
    assert not np.allclose(mirrored, tiny_backend.embed(tom), atol=1e-3)


def test_insightface_no_face_and_threshold(tiny_root, tiny_backend, photos):
    assert tiny_backend.faces(np.zeros((200, 160, 3), np.uint8)) == []
    assert tiny_backend.embed(np.zeros((200, 160, 3), np.uint8)) is None
    # The stand-in scores Tom Hanks at ~0.9998; a stricter threshold must drop the detection.
    strict = InsightFaceBackend(pack="tiny_pack", root=str(tiny_root), det_thresh=0.99999)
    assert strict.embed(photos[0]) is None


def test_insightface_home_env_var(tiny_root, photos, monkeypatch):
    monkeypatch.setenv("INSIGHTFACE_HOME", str(tiny_root))
    assert InsightFaceBackend(pack="tiny_pack").embed(photos[0]).shape == (512,)


def test_missing_insightface_pack_message(tmp_path, monkeypatch):
    monkeypatch.delenv("INSIGHTFACE_HOME", raising=False)
    with pytest.raises(InsightFacePackMissing) as info:
        InsightFaceBackend(pack="buffalo_l", root=str(tmp_path))
    msg = str(info.value)
    assert str(tmp_path / "models" / "buffalo_l") in msg
    for needle in ("buffalo_l", "model zoo", "--insightface_root", "$INSIGHTFACE_HOME", "--insightface_pack"):
        assert needle in msg
    # An empty pack folder is just as missing.
    (tmp_path / "models" / "buffalo_l").mkdir(parents=True)
    with pytest.raises(InsightFacePackMissing, match="no .onnx files"):
        make_backend("insightface", root=str(tmp_path))


def test_pack_without_detector_is_reported(tmp_path):
    folder = tmp_path / "models" / "half"
    folder.mkdir(parents=True)
    tiny_arcface(folder / "w_tiny.onnx")
    with pytest.raises(InsightFacePackMissing, match="no face detector"):
        InsightFaceBackend(pack="half", root=str(tmp_path))


def test_bad_inputs(tiny_backend, tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        tiny_backend.faces(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError, match="HxWx3"):
        tiny_backend.faces(np.zeros((64, 64), np.uint8))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageReadError, match="broken.png"):
        load_image_rgb(broken)
    with pytest.raises(ValueError, match="missing.jpg"):  # ImageReadError is a ValueError
        load_image_rgb(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="Unknown face backend"):
        make_backend("facenet")
    with pytest.raises(TypeError, match="takes: upsample"):
        make_backend("dlib", pack="buffalo_l")


@pytest.fixture(scope="module")
def dlib_backend():
    return DlibBackend(upsample=1)


def test_dlib_same_face_beats_different_people(dlib_backend, photos):
    tom, group = photos
    emb = dlib_backend.embed(tom)
    assert emb.shape == (128,) and abs(np.linalg.norm(emb) - 1.0) < 1e-5
    mirrored = dlib_backend.embed(np.ascontiguousarray(tom[:, ::-1]))
    others = dlib_backend.faces(group)
    assert len(others) >= 3  # t1.jpg shows six people
    areas = [f.area for f in others]
    assert areas == sorted(areas, reverse=True)  # largest face first
    same = float(emb @ mirrored)
    different = max(float(emb @ f.embedding) for f in others)
    assert same > 0.95
    assert same > different + 0.05
