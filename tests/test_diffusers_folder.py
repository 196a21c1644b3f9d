"""diffusers model folders as --ckpt_path: round trips (our tiny model -> diffusers pipeline save_pretrained -> our
loader -> the same tensors and images) for SD v1 and SDXL, older layouts, and one clear message per bad folder."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm.checkpoint import CheckpointError, load_model, read_state_dict
from ldm.sampling import txt2img_latents

pipelines = pytest.importorskip("bench.pipelines")


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model, tiny_config, tiny_sdxl, tiny_sdxl_config):
    """The tiny models saved by diffusers: {family: (folder, config, model)}."""
    root = tmp_path_factory.mktemp("diffusers")
    out = {}
    for family, config, model, make in [("v1", tiny_config, tiny_model, pipelines.sd_pipeline),
                                        ("sdxl", tiny_sdxl_config, tiny_sdxl, pipelines.sdxl_pipeline)]:
        make(config, model.state_dict()).save_pretrained(root / family)
        out[family] = (root / family, config, model)
    return out


def _copy(folders, family: str, tmp_path):
    folder, config, model = folders[family]
    dst = tmp_path / family
    shutil.copytree(folder, dst)
    return dst, config, model


def _same(model, back, family: str) -> None:
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    kw = dict(steps=2, scale=3.0, height=64, width=64, negative_prompt="blurry")
    torch.testing.assert_close(txt2img_latents(back, ["a red car"], [5], **kw),
                               txt2img_latents(model, ["a red car"], [5], **kw), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["v1", "sdxl"])
def test_round_trip_safetensors(folders, family):
    folder, config, model = folders[family]
    _same(model, load_model(config, folder), family)


def _old_vae_name(key: str) -> str:
    for new, old in {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}.items():
        if ".attentions." in key and f".{new}." in key:
            return key.replace(f".{new}.", f".{old}.")
    return key


@pytest.mark.parametrize("family", ["v1", "sdxl"])
def test_round_trip_bin_fp16_variant_and_older_layouts(folders, family, tmp_path):
    """Weights as .bin pickles (read weights-only) under an fp16 variant name, text encoders as transformers 4
    saved them (pytorch_model.bin with the `text_model.` level and position_ids), the VAE's attention under its
    pre-0.14 diffusers names (query/key/value/proj_attn)."""
    folder, config, model = _copy(folders, family, tmp_path)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not (folder / part).is_dir():
            continue
        src = next((folder / part).glob("*.safetensors"))
        sd = load_file(src)
        src.unlink()
        if part == "vae":
            sd = {_old_vae_name(k): v for k, v in sd.items()}
        if part.startswith("text_encoder"):
            sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
                  for k, v in sd.items()}
            sd["text_model.embeddings.position_ids"] = torch.arange(77)[None]
            torch.save(sd, folder / part / "pytorch_model.fp16.bin")
        else:
            torch.save(sd, folder / part / "diffusion_pytorch_model.fp16.bin")
    _same(model, load_model(config, folder), family)


def test_wrong_family_names_the_config(folders):
    (v1, v1_config, _), (xl, xl_config, _) = folders["v1"], folders["sdxl"]
    with pytest.raises(CheckpointError, match=r"SDXL diffusers folder .*--config_path configs/sdxl/sd_xl_base\.yaml"):
        load_model(v1_config, xl)
    with pytest.raises(CheckpointError, match=r"SD v1\.x diffusers folder .*configs/stable-diffusion/v1-inference"):
        load_model(xl_config, v1)
    with pytest.raises(CheckpointError, match="diffusers model folder: load it with load_model"):
        read_state_dict(v1)


class _Evil:
    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_bin_is_refused(folders, tmp_path):
    folder, config, _ = _copy(folders, "v1", tmp_path)
    marker = tmp_path / "pwned"
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"conv_in.weight": torch.zeros(1), "x": _Evil(marker)}, folder / "unet" / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"refused to load .*unet/diffusion_pytorch_model\.bin.*never executes"):
        load_model(config, folder)
    assert not marker.exists()


def test_bad_folders_get_one_clear_message(folders, tmp_path):
    folder, config, _ = _copy(folders, "sdxl", tmp_path)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    sd = load_file(unet)
    sd["extra_block.weight"] = torch.zeros(2)
    del sd["conv_in.bias"]
    save_file(sd, unet)
    with pytest.raises(CheckpointError, match=r"unet/diffusion_pytorch_model\.safetensors does not match the model "
                                              r"config: missing conv_in\.bias .*unexpected extra_block\.weight"):
        load_model(config, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(CheckpointError, match=r"text_encoder_2 is missing"):
        load_model(config, folder)
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps(json.loads(sched.read_text()) | {"prediction_type": "v_prediction"}))
    with pytest.raises(CheckpointError, match=r"scheduler_config\.json: prediction_type is 'v_prediction'"):
        load_model(config, folder)
    (folder / "model_index.json").unlink()
    with pytest.raises(CheckpointError, match="has no model_index.json"):
        load_model(config, folder)


@pytest.mark.parametrize("family", ["v1", "sdxl"])
def test_names_fit_full_size_diffusers_models(family, sd_config):
    """The name rules at full size, with no weights: the tensors of diffusers' and transformers' own models (built
    on meta, SD v1.5 / SDXL base configs) map onto every key of our full-size model with the right shapes."""
    from conftest import ROOT

    from ldm.checkpoint import build_model
    from ldm.diffusers_folder import _components, _normalise, map_component
    from ldm.util import load_config

    config = sd_config if family == "v1" else load_config(ROOT / "configs" / "sdxl" / "sd_xl_base.yaml")
    model = build_model(config, "meta")
    sd = model.state_dict()
    if family == "v1":
        refs = {"unet": pipelines.diffusers_unet(config, sd, "meta"),
                "text_encoder": pipelines.hf_text_model(config, sd, "meta")}
    else:
        refs = {"unet": pipelines.diffusers_sdxl_unet(config, sd, "meta", unet_config=pipelines.SDXL_BASE_UNET),
                "text_encoder": pipelines.hf_clip_l(config, sd, "meta"),
                "text_encoder_2": pipelines.hf_clip_g(config, sd, "meta")}
    refs["vae"] = pipelines.diffusers_vae(config, sd, "meta")
    parts = _components(model)
    assert sorted(folder for folder, *_ in parts) == sorted(refs)
    for folder, prefix, module, names in parts:
        mapped = map_component(_normalise(refs[folder].state_dict(), folder), names(module), module, folder)
        assert {prefix + k for k in mapped} == {k for k in sd if k.startswith(prefix)}
