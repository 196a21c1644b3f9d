"""The toy world (toyworld/): its files, renderer, shipped model and recogniser, and its scripts at reduced size."""

from __future__ import annotations

import ast
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apl.eval.faces import make_backend
from apl.latent_cache import file_digest
from apl.people import load_people, load_templates
from ldm.checkpoint import load_model, read_state_dict
from toyworld import world
from toyworld.make_model import CHECKPOINT, CONFIG
from toyworld.perception import ATTRIBUTE_HEADS, WEIGHTS, ToyPerception
from toyworld.render import Attributes, random_attributes, random_person, random_scene, render_person, render_scene

ROOT = Path(__file__).resolve().parents[1]
BACKEND = "toyworld.perception:ToyFaceBackend"


def test_method_code_never_imports_the_toy_world():
    """The toy world is a test-bed: ldm/, apl/, args/ and the scripts must work without it."""
    files = [*ROOT.glob("ldm/**/*.py"), *ROOT.glob("apl/**/*.py"), *ROOT.glob("args/*.py"), *ROOT.glob("*.py")]
    assert len(files) > 30
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "toyworld" for n in names), f"{path} imports {names}"
    code = ("import sys, train, test_id, test_fid_clip_score, dataset_generation, sample, export_prefix\n"
            "import apl.trainer, apl.eval.run_id, apl.eval.run_quality, apl.dataset_gen\n"
            "assert not [m for m in sys.modules if m.startswith('toyworld')], 'toyworld was imported'\n")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_committed_world_files_match_the_generator(tmp_path):
    world.write_data_files(tmp_path)
    for name in ("people.json", "toy_people.tsv", "toy_people_train.tsv", "toy_people_heldout.tsv",
                 "toy_templates.txt", "toy_templates_heldout.txt", "toy_prompts.txt", "toy_prompts_eval.txt",
                 "toy_person_prompts.txt"):
        assert (tmp_path / name).read_text() == (world.DATA / name).read_text(), f"{name} is out of date"


def test_people_file_reads_as_a_real_people_file():
    people = load_people(world.PEOPLE_TSV)
    named = world.load_named_people()
    assert list(people) == list(named) and len(people) == 100
    for name, desc in people.items():
        assert Attributes.parse(desc) == named[name].attributes
    # the original pairs still share a whole description: only the signature tells them apart
    assert people["Anya Brandt"] == people["Carla Mendes"] and people["Bruno Castell"] == people["Dario Kessler"]
    assert len({world._visible(p.signature) for p in named.values()}) == 100
    assert len({(p.signature.mark_spot, p.signature.mark_colour) for p in list(named.values())[:16]}) == 16
    assert {p.attributes.skin for p in named.values()} == {"light", "medium", "dark"}
    assert len(load_templates(world.TEMPLATES_TXT)) == len(world.TEMPLATES)
    train = set(world.general_captions(300, world.WORLD_SEED))
    held_out = [line.strip() for line in world.PROMPTS_EVAL_TXT.read_text().splitlines()]
    assert len(held_out) == 100 and not train & set(held_out)


def test_groups_split_the_cast_in_balanced_halves_with_look_alikes_together():
    named = world.load_named_people()
    groups = world.load_groups()
    assert groups == world.split_groups(named)
    for group, path in world.GROUP_TSV.items():
        members = load_people(path)
        assert list(members) == [n for n in named if groups[n] == group] == list(world.load_named_people(group=group))
        genders = [named[n].attributes.gender for n in members]
        assert len(members) == 50 and genders.count("female") == genders.count("male") == 25
    by_desc: dict[str, set[str]] = {}
    for name, person in named.items():
        by_desc.setdefault(person.attributes.describe(), set()).add(groups[name])
    assert all(len(g) == 1 for g in by_desc.values())
    assert sum(1 for n, p in named.items() if sum(q.attributes == p.attributes for q in named.values()) > 1) > 50


def test_heldout_templates_never_appear_in_training():
    held = load_templates(world.TEMPLATES_HELDOUT_TXT)
    assert held == world.heldout_templates() and len(held) == len(world.SHIRTS)
    phrases = [t.split("{name} ", 1)[1] for t in held]
    assert not any(ph in t for ph in phrases for t in world.TEMPLATES)
    for t in held:
        background, shirt = world.parse_template(t)
        assert background is not None and shirt is not None


def test_descriptions_round_trip():
    rng = random.Random(1)
    for _ in range(200):
        a = random_attributes(rng)
        assert Attributes.parse(a.describe()) == a
    with pytest.raises(ValueError, match="not a toy-world description"):
        Attributes.parse("A male person, European descent, brown eyes.")


def test_rendering_is_seeded_and_varies_the_look():
    person = random_person(random.Random(3))
    a, look_a = render_person(person, random.Random(7))
    b, look_b = render_person(person, random.Random(7))
    c, look_c = render_person(person, random.Random(8))
    assert np.array_equal(np.asarray(a), np.asarray(b)) and look_a == look_b
    assert a.size == (64, 64) and look_c != look_a and not np.array_equal(np.asarray(a), np.asarray(c))
    scene = render_scene(random_scene(random.Random(2)), random.Random(2))
    assert scene.size == (64, 64)


def test_templates_draw_what_they_name():
    rng = random.Random(0)
    for _ in range(50):
        caption, background, shirt, closeup = world.named_caption("Anya Brandt", rng)
        for key, phrase in world.BACKGROUNDS.items():
            assert (phrase in caption) == (background == key)
        assert closeup == ("close-up" in caption)
        assert (shirt is not None) == ("shirt" in caption)


def test_shipped_toy_checkpoint_is_small_and_loads_strictly():
    record = json.loads(CHECKPOINT.with_suffix(".json").read_text())
    assert CHECKPOINT.stat().st_size <= 8_000_000 and record["bytes"] == CHECKPOINT.stat().st_size
    assert record["sha256"] == file_digest(CHECKPOINT)
    assert record["people_json_sha256"] == file_digest(world.PEOPLE_JSON)
    sd = read_state_dict(CHECKPOINT)
    assert {v.dtype for k, v in sd.items() if k.startswith(("model.", "first_stage", "cond_stage"))} == {
        torch.float16}
    model = load_model(CONFIG, CHECKPOINT)  # strict: every key, every shape
    assert model.cond_stage_model.tokenizer.token_id("alz") == 41128
    assert model.image_size * 8 == 64


@pytest.fixture(scope="module")
def perception():
    return ToyPerception()


def test_recogniser_knows_the_named_cast_it_never_saw(perception):
    """Reference renders of the 16 named people (not in the recogniser's training set): the same person scores above
    the shipped threshold far more often than two different people, including the pairs that share a description."""
    names, images = [], []
    for name, _, image in world.reference_photos(world.load_named_people(), 6, seed=11):
        names.append(name)
        images.append(image)
    readings = perception.read(images)
    assert min(r.face_score for r in readings) > 0.5
    emb = np.stack([r.embedding for r in readings])
    sims = emb @ emb.T
    same = np.equal.outer(names, names) & ~np.eye(len(names), dtype=bool)
    thr = perception.info["id_threshold"]
    assert (sims[same] >= thr).mean() > 0.8
    assert (sims[~np.equal.outer(names, names)] >= thr).mean() < 0.02
    twins = np.isin(names, ["Anya Brandt", "Carla Mendes"])
    cross = np.outer(np.asarray(names) == "Anya Brandt", np.asarray(names) == "Carla Mendes") & twins[:, None]
    assert (sims[cross] >= thr).mean() < 0.1


def test_recogniser_reads_attributes_and_finds_no_face_in_scenes(perception):
    rng = random.Random(5)
    people = [random_person(rng) for _ in range(40)]
    readings = perception.read([render_person(p, rng)[0] for p in people])
    agree = np.mean([[r.attributes[k] == getattr(p.attributes, k) for k in ATTRIBUTE_HEADS]
                     for p, r in zip(people, readings, strict=True)])
    assert agree > 0.9
    scenes = perception.read([render_scene(random_scene(rng), rng) for _ in range(40)])
    assert np.mean([r.face_score < 0.5 for r in scenes]) > 0.95


def test_toy_backend_through_the_plugin_path(perception):
    backend = make_backend(BACKEND, det_thresh=0.5, device="cpu")
    assert backend.name == "toy" and backend.embedding_dim == 64
    assert backend.default_id_threshold == pytest.approx(perception.info["id_threshold"])
    image = np.asarray(render_person(random_person(random.Random(1)), random.Random(1))[0])
    faces = backend.faces(image)
    assert len(faces) == 1 and faces[0].embedding.shape == (64,)
    assert abs(np.linalg.norm(faces[0].embedding) - 1) < 1e-5
    x1, y1, x2, y2 = faces[0].bbox
    assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 64
    blank = np.full((64, 64, 3), 128, np.uint8)
    assert backend.faces(blank) == [] and backend.embed(blank) is None


def test_make_model_script_runs_at_reduced_size(tmp_path):
    out = tmp_path / "toy.safetensors"
    cmd = [sys.executable, "-m", "toyworld.make_model", "--named", "2", "--anonymous", "12", "--scenes", "6",
           "--unet_steps", "2", "--desc_steps", "2", "--desc_named", "1", "--desc_anonymous", "5", "--desc_scenes",
           "3", "--batch_size", "4", "--workers", "1", "--threads", "1", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["pictures"] == {"named": 200, "anonymous": 12, "scene": 6}
    assert record["description_stage_pictures"] == {"named": 100, "anonymous": 5, "scene": 3}
    assert record["sha256"] == file_digest(out) and out.with_suffix(".preview.png").is_file()
    load_model(CONFIG, out)


def test_make_perception_script_runs_at_reduced_size(tmp_path):
    out = tmp_path / "p.safetensors"
    cmd = [sys.executable, "-m", "toyworld.make_perception", "--ids", "16", "--per_id", "3", "--scenes", "20",
           "--steps", "2", "--batch_size", "24", "--calibration_pairs", "4", "--workers", "1", "--threads", "1",
           "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    p = ToyPerception(out)
    assert 0 < p.info["calibration_people"] == 8 and "id_threshold" in p.info
    assert WEIGHTS != out


def test_colour_codec_vae_is_its_cheap_formula():
    """The toy VAE's weights make it an exact linear colour codec; perception training uses the cheap formula of
    the same map, so the two must agree."""
    from ldm.models.autoencoder import AutoencoderKL
    from ldm.util import load_config
    from toyworld.colour_codec import codec_roundtrip, init_colour_codec

    params = load_config(CONFIG)["model"]["params"]["first_stage_config"]["params"]
    vae = AutoencoderKL(**{k: v for k, v in params.items() if k != "lossconfig"})
    init_colour_codec(vae)
    rng = random.Random(0)
    x = torch.stack([torch.from_numpy(np.array(render_person(random_person(rng), rng)[0])).permute(2, 0, 1)
                     for _ in range(8)]).float() / 127.5 - 1
    with torch.no_grad():
        z = vae.encode(x).mean
        out = vae.decode(z)
    assert torch.allclose(z[:, :3], torch.nn.functional.avg_pool2d(x, 8), atol=5e-3) and z[:, 3].abs().max() == 0
    assert (out - codec_roundtrip(x)).abs().max() < 1e-2
    with pytest.raises(ValueError, match="2 channels per GroupNorm group"):
        narrow = dict(params["ddconfig"], ch=32)
        init_colour_codec(AutoencoderKL(narrow, params["embed_dim"]))



def test_grid_shows_each_person_without_and_with(tmp_path, capsys):
    from toyworld.grid import CELL, LABEL, main

    run = tmp_path / "test_id"
    for mode in ("without", "with"):
        (run / "images" / mode).mkdir(parents=True)
        for name in ("Anya Brandt", "Bruno Castell"):
            for k in (0, 1, 10):
                Image.new("RGB", (64, 64), (10 * k, 0, 0)).save(run / "images" / mode / f"{name}-{k}.png")
    (run / "identity_with.csv").write_text("name,mean\nAnya Brandt,0.25\n")
    assert main([str(run), "--out", str(tmp_path / "grid.png"), "--per_side", "3"]) == 0
    grid = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    assert grid.shape[0] == 22 + 2 * CELL
    row = 22 + CELL // 2
    assert [grid[row, LABEL + c * CELL + CELL // 2, 0] for c in range(3)] == [0, 10, 100]  # k in numeric order
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "g2.png")]) == 2
    err = capsys.readouterr().err
    assert "toyworld.grid: error:" in err and "missing" in err and not (tmp_path / "g2.png").exists()
