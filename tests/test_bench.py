"""bench/: the benchmark runs end to end at the tiny sizes (SD v1 and SDXL) on the CPU (no timing assertions), and
its parts hold."""

from __future__ import annotations

import json
import math

import pytest
import torch

from apl.runtime import UsageError
from bench.baselines import PrefixInserter
from bench.bench import main, parse_args
from bench.report import check_targets, markdown_table


def _positive(x) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "results.json"
    res = main(["--size", "tiny", "--device", "cpu", "--threads", "1", "--out", str(out)])
    return res, out


@pytest.fixture(scope="module")
def tiny_sdxl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "sdxl.json"
    res = main(["--size", "tiny-sdxl", "--device", "cpu", "--threads", "1", "--out", str(out)])
    return res, out


def test_tiny_cpu_run_writes_every_section(tiny_run):
    res, out = tiny_run
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    assert res["errors"] == {}
    train = res["train"]
    assert set(train) == {"original_style", "diffusers_bf16", "ours"}
    assert set(train["original_style"]) == {"1"}
    assert set(train["diffusers_bf16"]) == set(train["ours"]) == {"1", "2"}
    for name, per_batch in train.items():
        for b, rec in per_batch.items():
            assert rec["batch"] == int(b)
            assert _positive(rec["samples_per_s"]) and _positive(rec["step_ms"]), (name, b, rec)
            assert rec["peak_gib"] is None  # CPU: no peak-memory counter
    for group in ("sampling", "decode"):
        assert set(res[group]) == {"diffusers_bf16", "ours"}
        for rec in res[group].values():
            assert _positive(rec["images_per_s"]) and rec["batch"] == 2
    assert res["sampling"]["ours"]["steps"] == 2
    for b in ("1", "2"):
        assert _positive(res["ratios"]["train"][b]["ours/diffusers_bf16"])
        assert _positive(res["ratios"]["train"][b]["ours/original_style"])
    assert _positive(res["ratios"]["sampling"]["ours/diffusers_bf16"])
    assert "note" in res["targets"]  # the targets are for full size on a GPU only


def test_tiny_cpu_numerics(tiny_run):
    res, _ = tiny_run
    num = res["numerics"]
    fp32 = num["fp32_ours_vs_diffusers"]
    assert fp32["unet"]["ref_max_abs"] > 1e-3 and fp32["unet"]["max_abs"] <= 1e-4  # same weights, same maths
    assert set(fp32) == {"unet", "text", "text_prefix"}
    assert fp32["text"]["max_abs"] <= 1e-4 and fp32["text_prefix"]["max_abs"] <= 1e-4
    bf16 = num["bf16_vs_fp32"]
    for part in ("unet", "text", "text_and_unet"):
        assert 0 < bf16[part]["rel_l2"] < 0.1, (part, bf16[part])  # bf16 really ran, and stayed close
    assert bf16["prefix_grad"]["cosine"] > 0.9


def test_table_lists_every_workload(tiny_run):
    res, _ = tiny_run
    table = markdown_table(res)
    for row in ("train original_style | 1", "train diffusers_bf16 | 2", "train ours | 2", "sampling ours",
                "decode diffusers_bf16", "bf16 vs fp32 unet"):
        assert row in table, row


def test_tiny_sdxl_cpu_run_has_the_sdxl_rows(tiny_sdxl_run):
    res, out = tiny_sdxl_run
    assert json.loads(out.read_text()) == json.loads(json.dumps(res, default=str))
    assert res["errors"] == {}
    meta = res["meta"]
    assert meta["family"] == "sdxl" and meta["config"] == "configs/tiny/tiny-sdxl.yaml" and meta["image_size"] == 64
    train = res["train"]
    assert set(train) == {"diffusers_bf16", "ours"}  # no original-style step: the original APL had no SDXL
    for name, per_batch in train.items():
        assert set(per_batch) == {"1", "2"}, name
        for b, rec in per_batch.items():
            assert rec["batch"] == int(b) and rec["dtype"] == "bf16"
            assert _positive(rec["samples_per_s"]) and _positive(rec["step_ms"]), (name, b, rec)
    for group in ("sampling", "decode"):
        assert set(res[group]) == {"diffusers_bf16", "ours"}
        for rec in res[group].values():
            assert _positive(rec["images_per_s"]) and rec["batch"] == 2
    assert res["sampling"]["ours"]["steps"] == res["sampling"]["diffusers_bf16"]["steps"] == 2
    for b in ("1", "2"):
        assert _positive(res["ratios"]["train"][b]["ours/diffusers_bf16"])
        assert res["ratios"]["train"][b]["ours/original_style"] is None
    assert _positive(res["ratios"]["sampling"]["ours/diffusers_bf16"])
    assert "note" in res["targets"]
    table = markdown_table(res)
    assert table.startswith("APL benchmark: tiny-sdxl size")
    for row in ("train diffusers_bf16 | 1", "train diffusers_bf16 | 2", "train ours | 1", "train ours | 2",
                "sampling diffusers_bf16 (DDIM 2", "sampling ours (DDIM 2", "decode ours", "pooled_prefix",
                "bf16 vs fp32 vector"):
        assert row in table, row
    assert "train original_style" not in table


def test_tiny_sdxl_numerics(tiny_sdxl_run):
    """Our fp32 SDXL UNet and both text encoders (context, pooled; with and without the prefix) equal diffusers'
    and transformers' on the same weights; bf16 stays close."""
    res, _ = tiny_sdxl_run
    num = res["numerics"]
    assert num["input"] == {"batch": 2, "t": [3, 871], "latent_hw": 8, "family": "sdxl"}
    fp32 = num["fp32_ours_vs_diffusers"]
    assert set(fp32) == {"unet", "text", "pooled", "text_prefix", "pooled_prefix"}
    for part, s in fp32.items():
        assert s["ref_max_abs"] > 1e-3 and s["max_abs"] <= 1e-4, (part, s)
    bf16 = num["bf16_vs_fp32"]
    for part in ("unet", "text", "vector", "text_and_unet"):
        assert 0 < bf16[part]["rel_l2"] < 0.1, (part, bf16[part])
    assert bf16["prefix_grad"]["cosine"] > 0.9


def test_baselines_reused_with_grad_checkpointing(tiny_run, tmp_path):
    _, first = tiny_run
    out = tmp_path / "ckpt.json"
    res = main(["--size", "tiny", "--device", "cpu", "--threads", "1", "--grad_ckpt", "--batches", "2",
                "--skip", "baselines,numerics,sampling", "--baselines_from", str(first), "--out", str(out)])
    assert res["errors"] == {}
    assert res["train"]["ours"]["2"]["grad_ckpt"] is True
    old = json.loads(first.read_text())
    assert res["train"]["diffusers_bf16"] == old["train"]["diffusers_bf16"]
    assert res["sampling"] == {"diffusers_bf16": old["sampling"]["diffusers_bf16"]}
    assert _positive(res["ratios"]["train"]["2"]["ours/diffusers_bf16"])
    assert "train/original_style" in res["meta"]["baselines_from"]["copied"]


def test_prefix_inserter_matches_embedding_manager(tiny_model):
    from ldm.modules.embedding_manager import EmbeddingManager

    em = EmbeddingManager(tiny_model.cond_stage_model, ["alz"], 10, generator=torch.Generator().manual_seed(3))
    vectors = em.string_to_param_dict["alz"].detach()
    ins = PrefixInserter(em.string_to_token_dict["alz"], vectors)
    prompts = ["alz A close-up portrait of Tom Hanks", "a photo of alz, smiling", "no placeholder here",
               "word " * 70 + "alz at the very end"]
    ids = tiny_model.cond_stage_model.tokenize(prompts)
    tok = tiny_model.cond_stage_model.transformer.text_model.embeddings.token_embedding(ids)
    with torch.no_grad():
        ours, ref = ins(ids, tok), em(ids, tok)
    assert not torch.equal(ref[0], tok[0])  # the prefix really went in
    assert torch.equal(ours, ref)
    # Expanded mode (SDXL's reference side): the ids already hold the placeholder N times, as EmbeddingManager's
    # expanded row does; the text model embeds those ids and the hook only puts the vectors in.
    expanded = ins.expand_ids(ids)
    assert torch.equal(expanded, em.expand_ids(ids)) and not torch.equal(expanded, ids)
    assert (expanded[0] == em.string_to_token_dict["alz"]).sum() == 10
    ins_x = PrefixInserter(em.string_to_token_dict["alz"], vectors, expanded=True)
    tok_x = tiny_model.cond_stage_model.transformer.text_model.embeddings.token_embedding(expanded)
    with torch.no_grad():
        assert torch.equal(ins_x(expanded, tok_x), ref)


def test_targets_are_judged_only_for_full_size_gpu():
    res = {
        "meta": {"size": "full", "device_type": "cuda"},
        "train": {"ours": {"1": {"samples_per_s": 33.0, "step_ms": 30.0, "peak_gib": 7.0},
                           "32": {"samples_per_s": 210.0, "step_ms": 150.0, "peak_gib": 20.0}},
                  "ours_graph": {"1": {"samples_per_s": 50.0, "step_ms": 20.0, "peak_gib": 7.5}}},
        "sampling": {"ours": {"images_per_s": 4.0}},
        "ratios": {"train": {"32": {"ours/diffusers_bf16": 2.1, "ours/original_style": 30.0}},
                   "sampling": {"ours/diffusers_bf16": 1.7}},
    }
    targets = check_targets(res)
    met = {k: v["met"] for k, v in targets.items()}
    # Each target takes our best variant and names it.
    assert targets["batch-1 step ms"]["by"] == "ours_graph" and targets["batch-1 step ms"]["value"] == 20.0
    assert targets["batch-1 peak GiB"]["by"] == "ours" and targets["batch-1 peak GiB"]["value"] == 7.0
    assert met == {
        "train samples/s at batch 32": True,
        "train vs diffusers_bf16 at batch 32": True,
        "train vs original_style at batch 32": False,
        "batch-1 step ms": True,
        "batch-1 peak GiB": False,
        "sampling images/s": False,
        "sampling vs diffusers_bf16": True,
    }
    res["meta"]["device_type"] = "cpu"
    assert "note" in check_targets(res)


def test_cli_checks_its_arguments():
    args = parse_args(["--size", "full", "--skip", "sampling,numerics"])
    assert args.batches == [1, 8, 32] and args.steps == 50 and args.image_size == 512
    assert args.numerics_image_size == 512
    assert args.skip == {"sampling_diffusers", "sampling_ours", "numerics"}
    sdxl = parse_args(["--size", "full-sdxl"])
    assert sdxl.batches == [1, 4] and sdxl.steps == 50 and sdxl.image_size == 1024
    assert sdxl.numerics_image_size == 512 and sdxl.sample_batch == 2
    assert parse_args(["--size", "full-sdxl", "--image_size", "256"]).numerics_image_size == 256
    for bad in (["--skip", "warp_drive"], ["--batches", "0,8"], ["--image_size", "60"], ["--cuda_graph", "--compile"],
                ["--numerics_image_size", "100"], ["--size", "huge-sdxl"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_cuda_graph_on_cpu_is_a_clear_error():
    with pytest.raises(UsageError, match="--cuda_graph needs a CUDA GPU; this run is on cpu"):
        main(["--device", "cpu", "--cuda_graph", "--out", "unused.json"])
