"""Saving/loading SD v1 checkpoints: round trips, tolerated extras, and one clear message per bad file."""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file

from ldm.checkpoint import CheckpointError, load_model, read_state_dict, save_checkpoint
from ldm.models.diffusion.ddpm import SCHEDULE_KEYS
from ldm.util import ConfigError, instantiate_from_config


@pytest.fixture(scope="module")
def tiny_sd(tiny_model):
    return {k: v.clone() for k, v in tiny_model.state_dict().items()}


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip(tmp_path, tiny_config, tiny_sd, suffix, dtype):
    path = tmp_path / f"model{suffix}"
    save_checkpoint(tiny_sd, path, dtype=dtype)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # atomic: no temp files left
    model = load_model(tiny_config, path)
    for k, v in model.state_dict().items():
        ref = tiny_sd[k] if k in SCHEDULE_KEYS else tiny_sd[k].to(dtype).float()
        assert v.dtype == torch.float32 and torch.equal(v, ref), k
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_load_in_half_precision_keeps_schedule_fp32(tmp_path, tiny_config, tiny_sd):
    path = tmp_path / "m.safetensors"
    save_checkpoint(tiny_sd, path)
    model = load_model(tiny_config, path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.alphas_cumprod.dtype == torch.float32


def test_top_level_state_dict_and_tolerated_extras(tmp_path, tiny_config, tiny_sd):
    sd = dict(tiny_sd)
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.diffusion_modelinput_blocks00weight"] = torch.zeros(1)
    sd["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    sd["logvar"] = torch.zeros(1000)
    path = tmp_path / "top.pt"
    torch.save(sd, path)  # no "state_dict" level
    load_model(tiny_config, path)


def test_old_transformers_clip_layout_is_accepted(tmp_path, tiny_config, tiny_sd):
    p = "cond_stage_model.transformer."
    sd = {(p + k[len(p + "text_model.") :] if k.startswith(p) else k): v for k, v in tiny_sd.items()}
    path = tmp_path / "old.safetensors"
    save_file(sd, str(path))
    load_model(tiny_config, path)


def test_lightning_callback_state_is_tolerated(tmp_path, tiny_config, tiny_sd):
    """Full SD .ckpt files pickle Lightning's ModelCheckpoint; it is rebuilt as an inert stand-in."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    saved = {n: sys.modules.get(n) for n in names}
    mod = types.ModuleType(names[-1])

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = torch.tensor(0.5)

    ModelCheckpoint.__module__ = names[-1]
    ModelCheckpoint.__qualname__ = "ModelCheckpoint"
    mod.ModelCheckpoint = ModelCheckpoint
    try:
        for n in names:
            sys.modules[n] = mod if n == names[-1] else types.ModuleType(n)
        path = tmp_path / "lightning.ckpt"
        torch.save({"state_dict": tiny_sd, "global_step": 470000, "callbacks": {"cb": ModelCheckpoint()}}, path)
    finally:
        for n, m in saved.items():
            sys.modules.pop(n) if m is None else sys.modules.__setitem__(n, m)
    load_model(tiny_config, path)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_not_executed(tmp_path, tiny_sd):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": tiny_sd, "payload": _Evil(marker)}, path)
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.ckpt.*never executes code"):
        read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(tmp_path, tiny_sd, suffix):
    path = tmp_path / f"cut{suffix}"
    save_checkpoint(tiny_sd, path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


def test_not_a_file(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_state_dict(tmp_path)
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="diffusers model folder"):
        read_state_dict(tmp_path)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_state_dict(tmp_path / "empty.ckpt")
    (tmp_path / "text.ckpt").write_text("hello, I am not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        read_state_dict(tmp_path / "text.ckpt")


def _expect(tmp_path, config, sd, match):
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(CheckpointError, match=match) as e:
        load_model(config, path)
    return str(e.value)


def test_missing_keys(tmp_path, tiny_config, tiny_sd):
    sd = {k: v for k, v in tiny_sd.items() if "output_blocks.1." not in k}
    msg = _expect(tmp_path, tiny_config, sd, "missing model.diffusion_model.output_blocks.1.")
    assert "in all]" in msg  # first few keys + a count


def test_wrong_shapes_and_wrong_model(tmp_path, tiny_config, sd_config, tiny_sd):
    sd = dict(tiny_sd)
    sd["model.diffusion_model.out.2.weight"] = torch.zeros(4, 32, 1, 1)
    _expect(
        tmp_path,
        tiny_config,
        sd,
        r"wrong shapes for 1 tensors \(model.diffusion_model.out.2.weight: file "
        r"\[4, 32, 1, 1\] vs model \[4, 32, 3, 3\]",
    )
    # The tiny file against the full SD v1 config: a different model.
    _expect(tmp_path, sd_config, tiny_sd, "wrong shapes")


@pytest.mark.parametrize(
    ("keys", "cause"),
    [
        ({"conditioner.embedders.0.transformer.x": (1,)}, "SDXL"),
        ({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (1,)}, "SD 2.x"),
        ({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": (4, 320)}, "LoRA"),
        ({"string_to_param.*": (10, 768)}, "embedding file"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
        ({"down_blocks.0.resnets.0.conv1.weight": (1,), "mid_block.x": (1,)}, "diffusers-format"),
        (
            {
                "encoder.conv_in.weight": (1,),
                "decoder.conv_in.weight": (1,),
                "quant_conv.weight": (1,),
                "post_quant_conv.weight": (1,),
                "encoder.x": (1,),
            },
            "VAE-only",
        ),
    ],
)
def test_cause_is_guessed(tmp_path, tiny_config, keys, cause):
    _expect(tmp_path, tiny_config, {k: torch.zeros(s) for k, s in keys.items()}, cause)


def test_all_bf16_file_loads(tmp_path, tiny_config, tiny_sd):
    """Some tools save every tensor in bf16, the schedule too (~4e-3 rounding): not 'another noise schedule'."""
    path = tmp_path / "bf16.safetensors"
    save_file({k: (v.to(torch.bfloat16) if v.is_floating_point() else v).contiguous() for k, v in tiny_sd.items()},
              str(path))
    model = load_model(tiny_config, path)
    assert model.betas.dtype == torch.float32


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 4265380512\n", "Git LFS pointer"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "web page"),
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "PNG image"),
        (b"hello, I am not a checkpoint", "not a PyTorch checkpoint"),
        (b"v1 weights, honest", "not a PyTorch checkpoint"),  # a byte that is no pickle opcode
    ],
)
def test_files_that_are_no_pickle_say_what_they_are(tmp_path, content, message):
    (tmp_path / "m.ckpt").write_bytes(content)
    with pytest.raises(CheckpointError, match=message) as e:
        read_state_dict(tmp_path / "m.ckpt")
    assert "would run code" not in str(e.value)


def test_safetensors_bytes_under_a_ckpt_name_load(tmp_path, tiny_sd):
    save_checkpoint(tiny_sd, tmp_path / "m.safetensors")
    (tmp_path / "m.ckpt").write_bytes((tmp_path / "m.safetensors").read_bytes())
    a, b = read_state_dict(tmp_path / "m.ckpt"), read_state_dict(tmp_path / "m.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_embedding_file_as_checkpoint(tmp_path, tiny_model):
    from ldm.modules.embedding_manager import EmbeddingManager

    EmbeddingManager(tiny_model.cond_stage_model, ["alz"], 2).save(tmp_path / "APL-1000.pt")
    with pytest.raises(CheckpointError, match="textual-inversion/APL embedding file; pass it as the embedding"):
        read_state_dict(tmp_path / "APL-1000.pt")


def test_binary_file_as_config(tmp_path, tiny_sd):
    from ldm.util import load_config

    save_checkpoint(tiny_sd, tmp_path / "m.ckpt")
    with pytest.raises(ConfigError, match="binary file, not a YAML config: is it a checkpoint"):
        load_config(tmp_path / "m.ckpt")


def test_textual_inversion_config_is_accepted(tiny_config):
    """The textual-inversion repo's v1 configs add personalization_config; APL builds its own prefix module."""
    import copy

    from ldm.checkpoint import build_model

    config = copy.deepcopy(tiny_config)
    config["model"]["params"]["personalization_config"] = {
        "target": "ldm.modules.embedding_manager.EmbeddingManager",
        "params": {"placeholder_strings": ["*"], "num_vectors_per_token": 1},
    }
    build_model(config, "meta")


def test_schedule_mismatch(tmp_path, tiny_config, tiny_sd):
    sd = dict(tiny_sd)
    sd["betas"] = sd["betas"] * 2
    _expect(tmp_path, tiny_config, sd, "schedule buffer 'betas' disagrees")


def test_config_targets_outside_the_registry_are_refused():
    with pytest.raises(ConfigError, match="never imports"):
        instantiate_from_config({"target": "os.system", "params": {"command": "echo hi"}})
    with pytest.raises(ConfigError, match="unsupported config keys"):
        instantiate_from_config(
            {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {"ddconfig": {}, "embed_dim": 4, "bogus": 1}}
        )


def test_clip_version_may_name_a_local_copy():
    from ldm.modules.encoders.modules import FrozenCLIPEmbedder

    with torch.device("meta"):
        FrozenCLIPEmbedder(version="/models/openai/clip-vit-large-patch14/", width=32, layers=1, heads=2)
        with pytest.raises(ValueError, match="unknown version 'laion/CLIP-ViT-H-14'"):
            FrozenCLIPEmbedder(version="laion/CLIP-ViT-H-14", width=32, layers=1, heads=2)


def test_unexpected_keys_are_refused(tmp_path, tiny_config, tiny_sd):
    sd = {k: v.clone().contiguous() for k, v in tiny_sd.items()}
    sd["model.diffusion_model.extra_block.weight"] = torch.zeros(2)
    path = tmp_path / "x.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match="unexpected model.diffusion_model.extra_block"):
        load_model(tiny_config, path)


@pytest.mark.parametrize(
    ("change", "precision", "message"),
    [
        ("nan", torch.float32, r"1 weight tensors hold NaN or infinite values \(model.diffusion_model.out.2.weight"),
        ("inf", torch.float32, "hold NaN or infinite values"),
        ("int8", torch.float32, r"not floating point \(e.g. model.diffusion_model.out.2.weight: torch.int8\)"),
        ("bool", torch.float32, "torch.bool"),
        ("huge", torch.float16, r"exceed the range of float16 .*--precision fp32 or bf16"),
    ],
)
def test_broken_values_are_refused(tmp_path, tiny_config, tiny_sd, change, precision, message):
    """Right keys and shapes but values that cannot be SD weights: one message naming the tensor, nothing loads."""
    sd = dict(tiny_sd)
    w = sd["model.diffusion_model.out.2.weight"].clone()
    if change in ("nan", "inf"):
        w.view(-1)[5] = float(change)
    elif change == "huge":
        w.view(-1)[5] = 1e6  # fine in fp32, infinite in fp16
    else:
        w = (w > 0).to(getattr(torch, change))
    sd["model.diffusion_model.out.2.weight"] = w
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_model(tiny_config, path, dtype=precision)
    assert str(path) in str(info.value)
    if change == "huge":  # the same file loads in fp32
        load_model(tiny_config, path)
