"""Latent cache (hits, misses, invalidation, skips) and atomic saves."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from apl.images import SkipReport, load_rgb
from apl.io import atomic_save, atomic_write_text
from apl.latent_cache import LatentCache, file_digest
from ldm.util import SaveError, remove_stale_temporaries

S = 16


class CountingEncoder:
    """Stand-in VAE encoder: 8x8 average pooling to 4 channels, recording every batch it sees."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        assert x.ndim == 4 and x.shape[1:] == (3, S, S) and x.min() >= -1 and x.max() <= 1
        self.batches.append(x.shape[0])
        pooled = torch.nn.functional.avg_pool2d(x, 8)  # (B, 3, 2, 2)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * 0.18215  # (B, 4, 2, 2)

    @property
    def images(self) -> int:
        return sum(self.batches)


def _images(folder, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _entries(cache_dir) -> list:
    return sorted(p for p in cache_dir.rglob("*") if p.is_file())


def test_file_digest(tmp_path):
    f = tmp_path / "x.bin"
    data = os.urandom(3 * (1 << 20) + 17)  # several read chunks
    f.write_bytes(data)
    assert file_digest(f) == hashlib.sha256(data).hexdigest()


def test_second_call_encodes_nothing(tmp_path):
    paths = _images(tmp_path, 5)
    enc = CountingEncoder()
    report = SkipReport()
    first = LatentCache(tmp_path / "cache", "vae-a", S).encode_all(paths, enc, 2, report, progress=False)
    assert enc.batches == [2, 2, 1] and not report
    assert list(first) == paths and all(v.shape == (4, 2, 2) for v in first.values())
    expected = enc(torch.stack([load_rgb(p, S) for p in paths]))
    for i, p in enumerate(paths):
        torch.testing.assert_close(first[p], expected[i])
    assert len(_entries(tmp_path / "cache")) == 5
    enc2 = CountingEncoder()
    second = LatentCache(tmp_path / "cache", "vae-a", S).encode_all(paths, enc2, 2, SkipReport(), progress=False)
    assert enc2.batches == []
    for p in paths:
        assert torch.equal(first[p], second[p])


def test_changed_content_is_reencoded(tmp_path):
    paths = _images(tmp_path, 3)
    cache = LatentCache(tmp_path / "cache", "vae-a", S)
    cache.encode_all(paths, CountingEncoder(), 4, SkipReport(), progress=False)
    before = cache.get(paths[1])
    Image.new("RGB", (20, 24), (255, 255, 255)).save(paths[1])
    assert cache.get(paths[1]) is None
    enc = CountingEncoder()
    after = cache.encode_all(paths, enc, 4, SkipReport(), progress=False)
    assert enc.batches == [1]
    assert not torch.equal(after[paths[1]], before)
    # renaming a file keeps its entry: the key is the content
    moved = tmp_path / "renamed.png"
    shutil.copy(paths[0], moved)
    assert torch.equal(cache.get(moved), after[paths[0]])


@pytest.mark.filterwarnings("error")  # a miss by key, not an entry rejected after reading
def test_model_key_and_size_are_part_of_the_key(tmp_path):
    paths = _images(tmp_path, 2)
    LatentCache(tmp_path / "cache", "vae-a", S).encode_all(paths, CountingEncoder(), 2, SkipReport(), progress=False)
    other_model = LatentCache(tmp_path / "cache", "vae-b", S)
    assert other_model.key(paths[0]) != LatentCache(tmp_path / "cache", "vae-a", S).key(paths[0])
    assert other_model.get(paths[0]) is None
    enc = CountingEncoder()
    other_model.encode_all(paths, enc, 2, SkipReport(), progress=False)
    assert enc.images == 2
    assert LatentCache(tmp_path / "cache", "vae-a", S * 2).key(paths[0]) != LatentCache(
        tmp_path / "cache", "vae-a", S
    ).key(paths[0])


def test_put_get_atomic_entry(tmp_path):
    path = _images(tmp_path, 1)[0]
    cache = LatentCache(tmp_path / "cache", "vae-a", S)
    assert cache.get(path) is None
    latent = torch.randn(4, 2, 2)
    cache.put(path, latent)
    files = _entries(tmp_path / "cache")
    assert len(files) == 1 and files[0].name == f"{cache.key(path)}.safetensors"  # no temporary file left behind
    assert torch.equal(cache.get(path), latent)
    with pytest.raises(ValueError, match=r"one \(C, h, w\) tensor"):
        cache.put(path, torch.zeros(1, 4, 2, 2))


def test_unreadable_images_are_counted_skips(tmp_path):
    good = _images(tmp_path, 2)
    bad = tmp_path / "bad.png"
    bad.write_bytes(good[0].read_bytes()[:60])
    missing = tmp_path / "missing.png"
    report = SkipReport()
    enc = CountingEncoder()
    out = LatentCache(tmp_path / "cache", "vae-a", S).encode_all(
        [good[0], bad, missing, good[1]], enc, 8, report, progress=False
    )
    assert list(out) == good and enc.batches == [2]
    assert report.by_reason() == {"unreadable image": 2}
    text = report.summary()
    assert "bad.png" in text and "missing.png" in text


def test_identical_files_encoded_once(tmp_path):
    a = _images(tmp_path, 1)[0]
    b = tmp_path / "copy.png"
    shutil.copy(a, b)
    enc = CountingEncoder()
    out = LatentCache(tmp_path / "cache", "vae-a", S).encode_all([a, b, a], enc, 4, SkipReport(), progress=False)
    assert enc.batches == [1] and list(out) == [a, b] and torch.equal(out[a], out[b])


def test_damaged_entry_is_reencoded_with_warning(tmp_path):
    path = _images(tmp_path, 1)[0]
    cache = LatentCache(tmp_path / "cache", "vae-a", S)
    cache.encode_all([path], CountingEncoder(), 1, SkipReport(), progress=False)
    entry = _entries(tmp_path / "cache")[0]
    entry.write_bytes(b"garbage")
    enc = CountingEncoder()
    with pytest.warns(UserWarning, match="unreadable latent cache entry"):
        out = cache.encode_all([path], enc, 1, SkipReport(), progress=False)
    assert enc.batches == [1] and out[path].shape == (4, 2, 2)
    assert torch.equal(cache.get(path), out[path])


def test_bad_arguments(tmp_path):
    path = _images(tmp_path, 1)[0]
    cache = LatentCache(tmp_path / "cache", "vae-a", S)
    with pytest.raises(ValueError, match=r"encode_fn returned \(4, 2, 2\) for a batch of 1"):
        cache.encode_all([path], lambda x: torch.zeros(4, 2, 2), 1, SkipReport(), progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        cache.encode_all([path], CountingEncoder(), 0, SkipReport(), progress=False)
    with pytest.raises(ValueError, match="model_key"):
        LatentCache(tmp_path / "cache", "", S)
    with pytest.raises(ValueError, match="size"):
        LatentCache(tmp_path / "cache", "k", 0)


# --- atomic saves --------------------------------------------------------------------------------------------


def test_atomic_save_keeps_suffix_and_replaces(tmp_path):
    target = tmp_path / "new" / "plot.png"
    seen = []

    def writer(tmp):
        seen.append(tmp)
        tmp.write_text("v1")

    atomic_save(writer, target)
    assert target.read_text() == "v1"
    assert seen[0].parent == target.parent and seen[0].suffix == ".png" and seen[0] != target
    atomic_write_text("v2", target)
    assert target.read_text() == "v2" and sorted(p.name for p in target.parent.iterdir()) == ["plot.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_save_gives_safetensors_files_ordinary_permissions(tmp_path):
    """safetensors' save_file creates its file with mode 0600; a saved prefix must be readable like any new file."""
    target = tmp_path / "alz.safetensors"
    atomic_save(lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)), target)
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_save_failure_leaves_old_file(tmp_path):
    target = tmp_path / "emb.pt"
    target.write_text("old")

    def failing(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(SaveError, match="disk full") as info:
        atomic_save(failing, target)
    assert str(target) in str(info.value) and "the previous emb.pt is unchanged" in str(info.value)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["emb.pt"]


def test_atomic_save_names_the_file_when_the_disk_is_full(tmp_path):
    """ENOSPC from a writer (whose own message names no file) becomes one line with the file and the advice."""
    import errno

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SaveError) as info:
        atomic_save(full, tmp_path / "train_state.pt")
    msg = str(info.value)
    assert msg.startswith(f"could not write {tmp_path / 'train_state.pt'}: No space left on device")
    assert "is full" in msg and "no train_state.pt was written" in msg and list(tmp_path.iterdir()) == []


def test_remove_stale_temporaries_only_takes_our_old_names(tmp_path):
    ours = tmp_path / ".train_state.0123456789ab.tmp.pt"
    other = tmp_path / ".notes.0123456789ab.tmp.txt"
    plain = tmp_path / "train_state.pt"
    for p in (ours, other, plain):
        p.write_text("x")
    assert remove_stale_temporaries(tmp_path, lambda name: name == "train_state.pt", older_than_s=3600) == []
    assert remove_stale_temporaries(tmp_path, lambda name: name == "train_state.pt") == [ours]
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, plain.name]
