"""Face-folder and general-folder scanning: the three caption layouts and every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from apl.datasets import FaceSample, GeneralSample, caption_only_samples, scan_face_folder, scan_general_folder
from apl.images import SkipReport

ROOT = Path(__file__).resolve().parents[1]
PEOPLE = {
    "Tom Hanks": "A male person, European descent.",
    "Jean-Claude Van Damme": "A male person, European descent.",
    "Penélope Cruz": "A female person, European descent.",
}


def _img(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path)
    return path


# --- face folder ---------------------------------------------------------------------------------------------


def test_face_folder_names(tmp_path):
    for name in ("Tom Hanks-0.png", "Tom Hanks-12.JPG", "Jean-Claude Van Damme-3.jpeg", "Penélope Cruz-1.webp"):
        _img(tmp_path / name)
    report = SkipReport()
    samples = scan_face_folder(tmp_path, PEOPLE, report)
    assert not report, report.summary()
    assert sorted((s.path.name, s.name) for s in samples) == [
        ("Jean-Claude Van Damme-3.jpeg", "Jean-Claude Van Damme"),
        ("Penélope Cruz-1.webp", "Penélope Cruz"),
        ("Tom Hanks-0.png", "Tom Hanks"),
        ("Tom Hanks-12.JPG", "Tom Hanks"),
    ]
    assert all(isinstance(s, FaceSample) for s in samples)


def test_face_folder_loose_name_match(tmp_path):
    _img(tmp_path / "tom_hanks-0.png")
    _img(tmp_path / "Pene\u0301lope Cruz-0.png")  # decomposed accent, as macOS writes file names
    report = SkipReport()
    samples = scan_face_folder(tmp_path, PEOPLE, report)
    assert sorted(s.name for s in samples) == ["Penélope Cruz", "Tom Hanks"] and not report


def test_face_folder_skips(tmp_path):
    _img(tmp_path / "Tom Hanks-0.png")
    _img(tmp_path / "Unknown Person-1.png")
    _img(tmp_path / "Unknown Person-2.png")
    _img(tmp_path / "no_dash.png")
    _img(tmp_path / "Tom Hanks-final.png")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    report = SkipReport()
    samples = scan_face_folder(tmp_path, PEOPLE, report)
    assert [s.path.name for s in samples] == ["Tom Hanks-0.png"]
    reasons = report.by_reason()
    assert reasons["no attribute description for 'Unknown Person' in people.tsv"] == 2
    assert reasons["file name does not match '<Person Name>-<k>.<ext>' (k a number)"] == 2
    assert sum("not an image file" in r for r in reasons) == 1
    assert sum("subfolder" in r for r in reasons) == 1
    assert report.count == 6  # .DS_Store is not counted
    # without a people dict every well-formed name is accepted
    names = sorted(s.name for s in scan_face_folder(tmp_path, None, SkipReport()))
    assert names == ["Tom Hanks", "Unknown Person", "Unknown Person"]


def test_face_folder_errors(tmp_path):
    with pytest.raises(ValueError, match=r"face image folder .*missing does not exist"):
        scan_face_folder(tmp_path / "missing", PEOPLE, SkipReport())
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match=r"file\.png is a file, not a folder"):
        scan_face_folder(f, PEOPLE, SkipReport())
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"contains no images .*'<Person Name>-<k>\.png'"):
        scan_face_folder(empty, PEOPLE, SkipReport())
    only_unknown = tmp_path / "unknown"
    _img(only_unknown / "Nobody-0.png")
    with pytest.raises(ValueError, match=r"no usable face images(.|\n)*no attribute description for 'Nobody'"):
        scan_face_folder(only_unknown, PEOPLE, SkipReport(), people_source="my_people.tsv")


# --- general folder ------------------------------------------------------------------------------------------


def test_metadata_jsonl_layout(tmp_path):
    _img(tmp_path / "a.jpg")
    _img(tmp_path / "sub" / "b.png")
    _img(tmp_path / "c.png")
    _img(tmp_path / "unlisted.png")
    lines = [
        json.dumps({"file_name": "a.jpg", "text": "a red car"}),
        "{not json",
        json.dumps({"file_name": "sub/b.png", "text": " a blue boat "}),
        json.dumps({"file_name": "gone.png", "text": "missing file"}),
        json.dumps({"file_name": "c.png", "text": "   "}),
        json.dumps({"text": "no file name"}),
        "",
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    report = SkipReport()
    samples = scan_general_folder(tmp_path, report)
    assert samples == [
        GeneralSample(tmp_path / "a.jpg", "a red car"),
        GeneralSample(tmp_path / "sub/b.png", "a blue boat"),
    ]
    reasons = report.by_reason()
    assert reasons == {
        "bad metadata.jsonl line (not JSON)": 1,
        "image listed in metadata.jsonl is missing": 1,
        "empty caption": 1,
        "bad metadata.jsonl line (no 'file_name' string)": 1,
        "image has no caption (not listed in metadata.jsonl)": 1,
    }
    assert "line 2" in report.examples("bad metadata.jsonl line (not JSON)")[0]
    assert "line 4" in report.examples("image listed in metadata.jsonl is missing")[0]
    assert "line 6" in report.examples("bad metadata.jsonl line (no 'file_name' string)")[0]


def test_sidecar_layout(tmp_path):
    _img(tmp_path / "cat.jpg")
    (tmp_path / "cat.txt").write_text("a cat on a sofa\n", encoding="utf-8")
    _img(tmp_path / "dog.PNG")
    (tmp_path / "dog.PNG.txt").write_text("a dog in a field", encoding="utf-8")
    _img(tmp_path / "bird.webp")  # no caption
    _img(tmp_path / "fish.png")
    (tmp_path / "fish.txt").write_text("  \n", encoding="utf-8")
    _img(tmp_path / "eel.png")
    (tmp_path / "eel.txt").write_bytes(b"caf\xe9 latin-1")
    report = SkipReport()
    samples = scan_general_folder(tmp_path, report)
    assert [(s.path.name, s.caption) for s in samples] == [
        ("cat.jpg", "a cat on a sofa"),
        ("dog.PNG", "a dog in a field"),
    ]
    assert report.by_reason() == {
        "image has no caption (no sidecar .txt)": 1,
        "empty caption": 1,
        "caption file is not UTF-8 text": 1,
    }


def test_original_laion_layout_matches_by_written_index(tmp_path):
    images = tmp_path / "laion"
    for i in (0, 1, 2, 5, 7):
        _img(images / f"laion_{i}.jpg")
    _img(images / "other.jpg")
    prompts = tmp_path / "prompts.txt"
    # line order differs from index order; index 2 has an empty caption; 7 is absent
    prompts.write_text("1 a blue boat\n0 a red car\n5 a green tree\n2\n", encoding="utf-8")
    report = SkipReport()
    samples = scan_general_folder(images, report, prompts_file=prompts)
    assert {s.path.name: s.caption for s in samples} == {
        "laion_0.jpg": "a red car",
        "laion_1.jpg": "a blue boat",
        "laion_5.jpg": "a green tree",
    }
    assert report.by_reason() == {
        "empty caption": 1,
        "image has no caption (no line with index in prompts.txt)": 1,
        "file name does not match 'laion_<i>.<ext>'": 1,
    }
    assert "index 7" in report.examples("image has no caption (no line with index in prompts.txt)")[0]


def test_laion_layout_default_prompts_file_and_shipped_prompts(tmp_path):
    _img(tmp_path / "laion_3.jpg")
    with pytest.raises(ValueError, match=r"captions file .*prompts\.txt does not exist"):
        scan_general_folder(tmp_path, SkipReport())
    samples = scan_general_folder(tmp_path, SkipReport(), prompts_file=ROOT / "prompts.txt")
    line3 = (ROOT / "prompts.txt").read_text(encoding="utf-8").splitlines()[3]
    assert samples[0].caption == line3.split(" ", 1)[1]
    (tmp_path / "prompts.txt").write_text("3 a lighthouse\n", encoding="utf-8")
    assert scan_general_folder(tmp_path, SkipReport())[0].caption == "a lighthouse"


def test_general_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        scan_general_folder(tmp_path / "missing", SkipReport())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no caption layout found \(no images and none of: a metadata\.jsonl"):
        scan_general_folder(tmp_path / "empty", SkipReport())
    _img(tmp_path / "plain" / "x.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) but none of: .*sidecar .*laion_<i>\.jpg"):
        scan_general_folder(tmp_path / "plain", SkipReport())
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "metadata.jsonl").write_text('{"file_name": "x.png", "text": "gone"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"no usable captioned images(.|\n)*listed in metadata\.jsonl is missing"):
        scan_general_folder(meta, SkipReport())


def test_caption_only_samples(tmp_path):
    samples = caption_only_samples(ROOT / "prompts.txt")
    assert len(samples) >= 300 and all(s.path is None and s.caption for s in samples)
    f = tmp_path / "p.txt"
    f.write_text("0 a car\n1\n2 a boat\n", encoding="utf-8")
    assert [s.caption for s in caption_only_samples(f)] == ["a car", "a boat"]
