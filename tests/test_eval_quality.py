"""CLIP score with a tiny random open_clip model, FID with a tiny feature extractor, and the missing-weights errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from eval_stand_ins import GROUP_PHOTO, TOM_HANKS, TinyFeatures, save_tiny_clip_weights
from PIL import Image

from apl.eval.images import LoadReport
from apl.eval.quality import (
    INCEPTION_FILE,
    ClipScorer,
    ClipWeightsMissing,
    InceptionWeightsMissing,
    build_fid,
    clip_score_summary,
    fid_antialias_default,
    fid_between,
    has_placeholder,
    load_image_folder,
    resolve_clip_weights,
    strip_placeholder,
)


def test_strip_placeholder():
    assert strip_placeholder("alz A close-up portrait of Tom Hanks") == "A close-up portrait of Tom Hanks"
    assert strip_placeholder("a photo of ALZ, smiling") == "a photo of, smiling"
    assert strip_placeholder("waltz in the alzheimer ward") == "waltz in the alzheimer ward"  # whole words only
    assert strip_placeholder("<v> a dog <v>", placeholder="<v>") == "a dog"
    assert strip_placeholder("no placeholder here") == "no placeholder here"
    assert not has_placeholder("A man riding a horse .") and not has_placeholder("waltz , alzheimer")
    assert has_placeholder("a photo of ALZ , smiling") and has_placeholder("<v> a dog", placeholder="<v>")


def _random_images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 200, (n, 3, size, size), generator=gen, dtype=torch.uint8)


def test_fid_identical_and_shifted_sets(tmp_path):
    fid = build_fid(TinyFeatures())
    a = _random_images(24, seed=0)
    assert abs(fid_between(fid, a, a.clone())) < 1e-3
    shifted = (a.int() + 55).clamp(0, 255).to(torch.uint8)
    far = fid_between(fid, a, shifted)
    assert far > 0.05
    # Another sample of the same distribution lies much closer than the shifted set.
    assert fid_between(fid, a, _random_images(24, seed=1)) < far / 5
    # PIL lists and folders give the same number as tensors.
    pil = [Image.fromarray(x.permute(1, 2, 0).numpy()) for x in shifted]
    for i, im in enumerate(pil):
        im.save(tmp_path / f"{i:03d}.png")
    assert fid_between(fid, a, pil, batch_size=5) == pytest.approx(far, rel=1e-6)
    assert fid_between(fid, a, tmp_path) == pytest.approx(far, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_between(fid, a, a[:1])
    with pytest.raises(ValueError, match="uint8"):
        fid_between(fid, a.float(), a)


def test_missing_inception_weights_message(tmp_path, monkeypatch):
    monkeypatch.delenv("APL_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(InceptionWeightsMissing) as info:
        build_fid("inception")
    for needle in (INCEPTION_FILE, "--inception_weights", "$APL_INCEPTION_WEIGHTS", "pytorch-fid"):
        assert needle in str(info.value)
    monkeypatch.setenv("APL_INCEPTION_WEIGHTS", str(tmp_path / "gone.pth"))
    with pytest.raises(InceptionWeightsMissing, match="gone.pth does not exist"):
        build_fid("inception")


class _Payload:
    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_inception_weights_file_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.target = str(marker)
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"fc.weight": payload}, f, protocol=2)
    with pytest.raises(ValueError, match="not a plain PyTorch state dict"):
        build_fid("inception", weights_path=str(tmp_path / "evil.pth"))
    assert not marker.exists()
    torch.save({"something": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="fc.weight"):
        build_fid("inception", weights_path=str(tmp_path / "other.pth"))


@pytest.mark.slow
def test_inception_fid_with_random_weights_in_the_pytorch_fid_format(tmp_path):
    """The real Inception path: a file with pt_inception's key names (torchvision layout) loads strictly."""
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(net.state_dict(), tmp_path / INCEPTION_FILE)
    fid = build_fid("inception", weights_path=str(tmp_path / INCEPTION_FILE))
    a = _random_images(2, seed=0, size=64)
    assert abs(fid_between(fid, a, a.clone())) < 1e-3


@pytest.mark.slow
def test_fid_antialias_reaches_the_inception_resize(tmp_path):
    import torchvision

    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    torch.save(net.state_dict(), tmp_path / INCEPTION_FILE)
    path = str(tmp_path / INCEPTION_FILE)
    assert fid_antialias_default() is True  # torchmetrics' default, which the flag keeps when unset
    assert build_fid("inception", weights_path=path).inception.use_antialias is True
    assert build_fid("inception", weights_path=path, antialias=False).inception.use_antialias is False
    assert build_fid("inception", weights_path=path, antialias=True).inception.use_antialias is True


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_clip")
    return save_tiny_clip_weights(folder)


def test_clip_score_tiny_model_is_deterministic(tiny_clip):
    from eval_stand_ins import TINY_CLIP_NAME

    images = [Image.open(TOM_HANKS), Image.open(GROUP_PHOTO)]
    prompts = ["A close-up portrait of Tom Hanks", "A group of people"]
    scorer = ClipScorer(TINY_CLIP_NAME, pretrained=str(tiny_clip), device="cpu")
    s1 = scorer.score(images, prompts)
    assert s1.shape == (2,) and np.all(np.abs(s1) <= 1.0)
    np.testing.assert_allclose(scorer.score(images, prompts, batch_size=1), s1, atol=1e-6)
    again = ClipScorer(TINY_CLIP_NAME, pretrained=str(tiny_clip))
    np.testing.assert_allclose(again.score(images, prompts), s1, atol=1e-6)
    swapped = scorer.score(images, prompts[::-1])
    assert not np.allclose(swapped, s1, atol=1e-4)  # the text matters
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer.score(images, prompts[:1])


def test_clip_local_dir_model(tiny_clip, tmp_path):
    from eval_stand_ins import TINY_CLIP_NAME, tiny_clip_config

    images, prompts = [Image.open(TOM_HANKS)], ["a portrait"]
    (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": tiny_clip_config()}))
    with pytest.raises(ClipWeightsMissing, match="open_clip_config.json and the weights"):
        ClipScorer(f"local-dir:{tmp_path}")
    shutil.copy(tiny_clip, tmp_path / "open_clip_pytorch_model.bin")
    local = ClipScorer(f"local-dir:{tmp_path}").score(images, prompts)
    named = ClipScorer(TINY_CLIP_NAME, pretrained=str(tiny_clip)).score(images, prompts)
    np.testing.assert_allclose(local, named, atol=1e-6)


def test_clip_score_summary_hand_computed():
    s = clip_score_summary(np.array([0.5, -0.2, 0.3]))
    assert s["clip_cosine_mean"] == pytest.approx(0.2)
    assert s["clip_score"] == pytest.approx((50 + 0 + 30) / 3)
    assert s["n"] == 3


def test_missing_clip_weights_message(tmp_path):
    with pytest.raises(ClipWeightsMissing) as info:
        ClipScorer("ViT-g-14", "laion2b_s34b_b88k", cache_dir=str(tmp_path))
    msg = str(info.value)
    for needle in ("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", "open_clip_model.safetensors", "--clip_pretrained"):
        assert needle in msg
    with pytest.raises(ClipWeightsMissing, match="laion2b_s34b_b88k"):  # lists the known tags
        ClipScorer("ViT-g-14", str(tmp_path / "nope.bin"), cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="Unknown open_clip model"):
        ClipScorer("ViT-Q-99", "x")


def test_clip_weights_found_in_local_hf_cache(tmp_path):
    """A tag whose file sits in the Hugging Face cache layout resolves to that file, with the tag's preprocessing."""
    snap = tmp_path / "models--laion--CLIP-ViT-g-14-laion2B-s34B-b88K" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "open_clip_pytorch_model.bin").write_bytes(b"weights")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    path, preprocess = resolve_clip_weights("ViT-g-14", "laion2b_s34b_b88k", cache_dir=str(tmp_path))
    assert path == str(snap / "open_clip_pytorch_model.bin")
    assert preprocess["image_interpolation"] == "bicubic" and len(preprocess["image_mean"]) == 3


def test_load_image_folder_counts_unreadable(tmp_path):
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "b.png")
    Image.new("L", (8, 6), 7).save(tmp_path / "a.JPG")
    (tmp_path / "c.png").write_bytes(b"garbage")
    (tmp_path / "readme.txt").write_text("not an image")
    report = LoadReport()
    images = load_image_folder(tmp_path, report)
    assert [im.size for im in images] == [(8, 6), (8, 8)]  # sorted by name, grey converted to RGB
    assert all(im.mode == "RGB" for im in images)
    assert report.loaded == 2 and [p.rsplit("/", 1)[-1] for p in report.unreadable] == ["c.png"]
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")
