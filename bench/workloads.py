"""The benchmark's workloads: each builds only its own models on the device, times them and records the result.

The same workloads serve SD v1 and SDXL: on our side the model, its prefix (`make_prefix`: one EmbeddingManager per
text encoder) and its token ids (`tokenize_prompts`) come as train.py gets them; the reference side's UNet and
text encoders come from `bench.pipelines.reference_unet` / `reference_text` for the config's family.

Timing: warm-up calls (compilation and CUDA-graph capture happen there), then timed calls with one synchronize at
the end. Peak memory is torch.cuda.max_memory_allocated over warm-up and timed calls together (resident weights
included): a captured graph allocates its memory pool during capture and nothing when it replays; None on the CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import traceback
from collections.abc import Callable, Mapping
from functools import partial

import torch

from apl.io import atomic_write_text
from apl.step import StaticStep, apl_loss
from bench.baselines import (
    cached_latent_step,
    ddim_sample,
    diffusers_vae,
    original_style_step,
    text_parts,
    vae_decode,
)
from bench.pipelines import is_sdxl_config, prefix_parameters, reference_text, reference_unet
from bench.report import check_targets, compute_ratios, describe_record, error_stats
from ldm.checkpoint import build_model
from ldm.models.diffusion.ddpm import SCHEDULE_KEYS
from ldm.modules.prefix import make_prefix, tokenize_prompts
from ldm.sampling import txt2img_latents

PRECISIONS = {"bf16": torch.bfloat16, "fp32": torch.float32}
PLACEHOLDER = "alz"
# (name, attribute description): private "alz A close-up portrait of <name>", neutral "... of <description>"
PEOPLE = [
    ("Tom Hanks", "a male person, European descent, short brown hair, blue eyes"),
    ("Serena Williams", "a female person, African descent, long black hair, brown eyes"),
    ("Jackie Chan", "a male person, East Asian descent, short black hair, brown eyes"),
    ("Emma Watson", "a female person, European descent, long brown hair, brown eyes"),
    ("Shah Rukh Khan", "a male person, South Asian descent, wavy black hair, brown eyes"),
    ("Penelope Cruz", "a female person, Hispanic descent, long dark hair, brown eyes"),
    ("Morgan Freeman", "an old male person, African descent, short grey hair, brown eyes"),
    ("Greta Thunberg", "a young female person, European descent, braided brown hair, blue eyes"),
]
GIB = 2**30


def train_prompts(batch: int) -> tuple[list[str], list[str]]:
    """(private, neutral) prompt lists of length `batch`, cycling through PEOPLE."""
    rows = [PEOPLE[i % len(PEOPLE)] for i in range(batch)]
    return ([f"{PLACEHOLDER} A close-up portrait of {n}" for n, _ in rows],
            [f"A close-up portrait of {d}" for _, d in rows])


def sample_prompts(batch: int) -> list[str]:
    """`batch` plain portrait prompts for sampling (no prefix)."""
    return [f"A close-up portrait of {PEOPLE[i % len(PEOPLE)][0]}, studio lighting" for i in range(batch)]


# ----- devices, models, timing -----


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocated_gib(device: torch.device) -> float | None:
    return torch.cuda.memory_allocated(device) / GIB if device.type == "cuda" else None


def free_device(device: torch.device) -> None:
    """Drop compiled graphs (they keep their modules alive) and cached blocks between workloads."""
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn: Callable[[], object], iters: int, warmup: int, device: torch.device) -> dict:
    """`warmup` untimed calls, then `iters` timed ones with one synchronize at the end; the peak memory of both."""
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        fn()
    _sync(device)
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    total = time.perf_counter() - t0
    cuda = device.type == "cuda"
    peak = torch.cuda.max_memory_allocated(device) / GIB if cuda else None
    reserved = torch.cuda.max_memory_reserved(device) / GIB if cuda else None
    return {"iters": iters, "warmup": warmup, "warmup_s": round(warm_s, 3), "total_s": round(total, 4),
            "ms_per_iter": 1000.0 * total / iters, "peak_gib": peak, "peak_reserved_gib": reserved}


def master_state_dict(config: dict, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random SD-layout weights, kept on the CPU in fp32; every workload copies what it needs."""
    torch.manual_seed(seed)
    model = build_model(config, device)  # random init runs fastest on the device itself
    sd = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    del model
    free_device(device)
    return sd


def build_ours(config: dict, sd: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype):
    """Our LatentDiffusion with the weights of `sd` in `dtype` (schedule buffers stay fp32), frozen, eval mode."""
    model = build_model(config, "meta")
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in sd.items() if k not in SCHEDULE_KEYS}
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if k not in SCHEDULE_KEYS]
    if missing or unexpected:
        raise RuntimeError(f"our model does not take the benchmark weights: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.register_schedule()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"internal error: tensors left on the meta device: {left[:5]}")
    return model.eval().requires_grad_(False)


COMPILE_DYNAMIC = {"auto": None, "static": False, "dynamic": True}


def compile_unet(model, mode: str, dynamic: str = "auto") -> None:
    """torch.compile our UNet in place. 'auto' (PyTorch's default) compiles the first batch size statically and
    a second one with a symbolic batch that serves every later size; 'static' compiles once per batch size."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # batch sizes x grad modes, without falling back to eager
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    unet = model.model.diffusion_model
    model.model.diffusion_model = torch.compile(
        unet, mode=None if mode == "default" else mode, dynamic=COMPILE_DYNAMIC[dynamic]
    )


def prefix_vectors(n: int, width: int, seed: int) -> torch.Tensor:
    """The prefix's starting value, uniform [0, 1) as the original initialised it; the same on both sides."""
    return torch.rand(n, width, generator=torch.Generator().manual_seed(seed))


def our_text_parts(cond: torch.Tensor | Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our conditioning by part: 'text' (the context), and for SDXL 'vector' (pooled text + size features)."""
    if isinstance(cond, Mapping):
        return {"text": cond["crossattn"], "vector": cond["vector"]}
    return {"text": cond}


# ----- workloads -----


class Workloads:
    """Holds the settings, the master weights and the results; writes the JSON after every measurement."""

    def __init__(self, args: argparse.Namespace, config: Mapping, device: torch.device) -> None:
        self.args = args
        self.device = device
        self.dtype = PRECISIONS[args.precision]
        self.config = config
        self.latent_hw = args.image_size // 8
        self.sdxl = is_sdxl_config(config)
        self.family = "sdxl" if self.sdxl else "sd1"
        self.results: dict = {"meta": {}, "train": {}, "sampling": {}, "decode": {}, "numerics": {}, "errors": {}}
        self._sd: dict[str, torch.Tensor] | None = None

    @property
    def sd(self) -> dict[str, torch.Tensor]:
        """The master weights (built on first use)."""
        if self._sd is None:
            self._sd = master_state_dict(self.config, self.device, self.args.seed)
        return self._sd

    def size_kwargs(self, side: int) -> dict:
        """SDXL's size conditioning for side x side px images, uncropped, as train.py and txt2img give it."""
        return {"target_size": (side, side)} if self.sdxl else {}

    def prefix_init(self, index: int, width: int) -> torch.Tensor:
        """The starting vectors of text encoder `index` (width wide), the same on both sides."""
        return prefix_vectors(self.args.num_vectors, width, self.args.seed + index)

    def reset_prefix(self, em) -> None:
        """Set our prefix (EmbeddingManager or PrefixSet) to `prefix_init`, encoder by encoder."""
        with torch.no_grad():
            for i, p in enumerate(em.embedding_parameters()):
                p.copy_(self.prefix_init(i, p.shape[1]))

    def our_prefix(self, model):
        """Our prefix for `model` as train.py makes it (make_prefix), starting from `prefix_init`, on the device."""
        em = make_prefix(model, PLACEHOLDER, self.args.num_vectors)
        self.reset_prefix(em)
        return em.to(self.device)

    def reference_text(self, dtype: torch.dtype, side: int, prefix: bool):
        """The reference side's text encoders (with the prefix if `prefix`) for side x side px images."""
        init = self.prefix_init if prefix else None
        return reference_text(self.config, self.sd, self.device, dtype, side, init, PLACEHOLDER)

    def save(self) -> None:
        """Recompute ratios and targets, then write the JSON atomically."""
        self.results["ratios"] = compute_ratios(self.results)
        self.results["targets"] = check_targets(self.results)
        atomic_write_text(json.dumps(self.results, indent=2, default=str) + "\n", self.args.out)

    def record(self, group: str, name: str, key: str | None, rec: dict) -> None:
        """Store one measurement under results[group][name][key] (or [group][name]), save, print a line."""
        slot = self.results[group].setdefault(name, {}) if key is not None else self.results[group]
        slot[key if key is not None else name] = rec
        self.save()
        what = f"{group}/{name}" + (f" b={key}" if key is not None else "")
        print(f"  {what}: {describe_record(rec)}", flush=True)

    def run(self, name: str, fn: Callable[[], None]) -> None:
        """Run one workload; an error is recorded (and the run goes on) so one failure does not lose the rest."""
        if name in self.args.skip:
            return
        print(f"[{name}]", flush=True)
        try:
            fn()
        except Exception as e:  # OOM, compile failure, ...: keep the other measurements of this one-shot run
            msg = f"{type(e).__name__}: {e}".strip()
            self.results["errors"][name] = msg
            print(f"  FAILED: {msg}\n{traceback.format_exc(limit=4)}", flush=True)
            self.save()
        finally:
            free_device(self.device)
            left = _allocated_gib(self.device)
            if left is not None and left > 0.05:
                print(f"  note: {left:.2f} GiB still allocated after {name}", flush=True)

    # --- training steps ---

    def _train_record(self, batch: int, t: dict, weights_gib: float | None, **extra) -> dict:
        return {"batch": batch, "samples_per_s": batch * 1000.0 / t["ms_per_iter"], "step_ms": t["ms_per_iter"],
                "peak_gib": t["peak_gib"], "peak_reserved_gib": t["peak_reserved_gib"], "weights_gib": weights_gib,
                "warmup_s": t["warmup_s"], "iters": t["iters"], "warmup": t["warmup"], **extra}

    def original_style(self) -> None:
        """diffusers fp32, batch 1, as the original trained: VAE encode, 3 UNet passes per step (SD v1 only)."""
        a, dev = self.args, self.device
        if self.sdxl:
            print("  not measured for SDXL: the original APL trained SD v1 only", flush=True)
            return
        unet = reference_unet(self.config, self.sd, dev, torch.float32)
        vae = diffusers_vae(self.config, self.sd, dev, torch.float32)
        text = self.reference_text(torch.float32, a.image_size, prefix=True)
        opt = torch.optim.Adam(prefix_parameters(text), lr=1e-3)
        image = torch.rand(1, 3, a.image_size, a.image_size, generator=torch.Generator().manual_seed(1)) * 2 - 1
        private, neutral = train_prompts(1)
        step = original_style_step(unet, vae, text, opt, image.to(dev), private, neutral)
        weights = _allocated_gib(dev)
        t = timed(step, a.iters, a.warmup, dev)
        self.record("train", "original_style", "1", self._train_record(1, t, weights, dtype="fp32", unet_passes=3))

    def diffusers_bf16(self) -> None:
        """diffusers bf16 + SDPA, cached latents, one no-grad + one grad UNet pass, at each batch size."""
        a, dev = self.args, self.device
        unet = reference_unet(self.config, self.sd, dev, self.dtype)
        text = self.reference_text(self.dtype, a.image_size, prefix=True)
        opt = torch.optim.Adam(prefix_parameters(text), lr=1e-3)
        weights = _allocated_gib(dev)
        for b in a.batches:
            z0 = torch.randn(b, unet.config.in_channels, self.latent_hw, self.latent_hw, device=dev)  # cached latents
            private, neutral = train_prompts(b)
            step = cached_latent_step(unet, text, opt, z0, private, neutral)
            t = timed(step, a.iters, a.warmup, dev)
            self.record("train", "diffusers_bf16", str(b), self._train_record(b, t, weights, dtype=a.precision))
            del z0, step
            free_device(dev)

    def ours(self) -> None:
        """Our model with apl_loss + Adam at each batch size (optionally compiled / checkpointed)."""
        a, dev = self.args, self.device
        model = build_ours(self.config, self.sd, dev, self.dtype)
        model.model.diffusion_model.set_channels_last(a.channels_last)
        if a.grad_ckpt:
            model.model.diffusion_model.set_gradient_checkpointing(True)
        if a.compile:
            compile_unet(model, a.compile_mode, a.compile_dynamic)
        em = self.our_prefix(model)  # SD v1: one EmbeddingManager; SDXL: a PrefixSet (one per text encoder)
        tokenize = partial(tokenize_prompts, model)  # (B, 77) ids, or one (B, 77) per text encoder (SDXL)
        opt = torch.optim.Adam(em.embedding_parameters(), lr=1e-3)
        weights = _allocated_gib(dev)
        params = em.embedding_parameters()
        name = "ours_graph" if a.cuda_graph else "ours"
        for b in a.batches:
            shape = (model.channels, self.latent_hw, self.latent_hw)
            z0 = torch.randn(b, *shape, device=dev)  # the trainer gathers cached latents on the device
            private, neutral = train_prompts(b)
            # As apl.trainer.train does it: t and noise drawn on the CPU, prompts tokenized, all copied into the
            # static step (captured in a CUDA graph with --cuda_graph), then Adam on the prefix; SDXL conditions on
            # the image size.
            device_step = StaticStep(model, em, b, shape, graph=a.cuda_graph,
                                     cond_kwargs=self.size_kwargs(a.image_size) or None)

            def step(z0=z0, private=private, neutral=neutral, device_step=device_step, shape=shape) -> None:
                b = z0.shape[0]
                t = torch.randint(0, model.num_timesteps, (b,))
                noise = torch.randn(b, *shape)
                device_step.load(z0, t, noise, tokenize(private), tokenize(neutral))
                _, grads = device_step.run()
                for p, grad in zip(params, grads, strict=True):
                    p.grad = grad
                opt.step()

            t = timed(step, a.iters, a.warmup, dev)
            extra = dict(dtype=a.precision, compile=a.compile_mode if a.compile else False, grad_ckpt=a.grad_ckpt,
                         cuda_graph=a.cuda_graph, channels_last=a.channels_last)
            self.record("train", name, str(b), self._train_record(b, t, weights, **extra))
            del z0, step, device_step
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()  # a captured graph's memory pool goes with it (compiled graphs stay)

    # --- sampling ---

    def _sample_record(self, t: dict) -> dict:
        a = self.args
        return {"batch": a.sample_batch, "steps": a.steps, "scale": a.scale, "dtype": a.precision,
                "images_per_s": a.sample_batch * 1000.0 / t["ms_per_iter"], "s_per_batch": t["ms_per_iter"] / 1000,
                "peak_gib": t["peak_gib"], "warmup_s": t["warmup_s"], "iters": t["iters"]}

    def _decode_record(self, t: dict) -> dict:
        b = self.args.sample_batch
        return {"batch": b, "ms_per_batch": t["ms_per_iter"], "images_per_s": b * 1000.0 / t["ms_per_iter"],
                "peak_gib": t["peak_gib"], "iters": t["iters"]}

    def sampling_diffusers(self) -> None:
        """diffusers DDIM + CFG loop, then (unless skipped) the VAE decode of its latents."""
        a, dev = self.args, self.device
        unet = reference_unet(self.config, self.sd, dev, self.dtype)
        text = self.reference_text(self.dtype, a.image_size, prefix=False)
        vae = diffusers_vae(self.config, self.sd, dev, self.dtype) if "decode" not in a.skip else None
        prompts = sample_prompts(a.sample_batch)
        out: list[torch.Tensor] = []

        def sample() -> None:
            g = torch.Generator(dev).manual_seed(a.seed)
            out[:] = [ddim_sample(unet, text, prompts, self.latent_hw, a.steps, a.scale, g)]

        t = timed(sample, a.sample_iters, 1, dev)
        self.record("sampling", "diffusers_bf16", None, self._sample_record(t))
        if vae is not None:
            z = out[0]
            t = timed(lambda: vae_decode(vae, z), a.sample_iters, 1, dev)
            self.record("decode", "diffusers_bf16", None, self._decode_record(t))

    def sampling_ours(self) -> None:
        """Our txt2img_latents (DDIM + CFG), then (unless skipped) our VAE decode."""
        a, dev = self.args, self.device
        model = build_ours(self.config, self.sd, dev, self.dtype)
        model.model.diffusion_model.set_channels_last(a.channels_last)
        if a.compile:
            compile_unet(model, a.compile_mode, a.compile_dynamic)
        prompts = sample_prompts(a.sample_batch)
        seeds = [a.seed + i for i in range(a.sample_batch)]
        size = a.image_size
        out: list[torch.Tensor] = []

        def sample() -> None:
            out[:] = [txt2img_latents(model, prompts, seeds, steps=a.steps, scale=a.scale, height=size, width=size)]

        t = timed(sample, a.sample_iters, 1, dev)
        self.record("sampling", "ours", None, {**self._sample_record(t), "compile": a.compile_mode if a.compile
                                               else False, "channels_last": a.channels_last})
        if "decode" not in a.skip:
            z = out[0]
            t = timed(lambda: torch.no_grad()(model.decode_first_stage)(z), a.sample_iters, 1, dev)
            self.record("decode", "ours", None, self._decode_record(t))

    # --- numerics ---

    def numerics(self) -> None:
        """Our fp32 vs diffusers fp32 (UNet on our conditioning; text features without and with the prefix), and
        our low precision vs our fp32 (UNet, text, loss, prefix grad). At --numerics_image_size (SDXL full: 512)."""
        a, dev = self.args, self.device
        side = a.numerics_image_size
        hw, size = side // 8, self.size_kwargs(side)
        model = build_ours(self.config, self.sd, dev, torch.float32)
        g = torch.Generator().manual_seed(a.seed + 7)
        x = torch.randn(2, model.channels, hw, hw, generator=g).to(dev)
        t = torch.tensor([3, 871], device=dev)
        prompts = ["A close-up portrait of a person, studio lighting", "a dog on the beach"]
        private, neutral = train_prompts(2)
        em = self.our_prefix(model)

        def prefix_grad() -> tuple[torch.Tensor, torch.Tensor]:
            self.reset_prefix(em)
            em.zero_grad(set_to_none=True)
            z_t = model.q_sample(x, t, x.flip(0))
            loss = apl_loss(model, em, z_t, t, private, neutral, cond_kwargs=size or None).mean()
            loss.backward()
            return loss.detach(), torch.cat([p.grad.detach().flatten() for p in em.embedding_parameters()])

        vs_ref: dict[str, dict] = {}
        with torch.no_grad():
            cond32 = model.get_learned_conditioning(prompts, **size)
            eps32 = model.apply_model(x, t, cond32)
            text = self.reference_text(torch.float32, side, prefix=True)
            unet = reference_unet(self.config, self.sd, dev, torch.float32)
            vs_ref["unet"] = error_stats(eps32, unet(x, t, **text.inputs_of(cond32)).sample)
            del unet
            cond_p = model.get_learned_conditioning(private, embedding_manager=em, **size)
            for suffix, ours, ref in (("", cond32, text(prompts)), ("_prefix", cond_p, text(private))):
                theirs = text_parts(ref)
                for part, value in text_parts(text.inputs_of(ours)).items():
                    vs_ref[part + suffix] = error_stats(value, theirs[part])
            del text
        loss32, grad32 = prefix_grad()
        model.set_precision(self.dtype)
        with torch.no_grad():
            cond16 = model.get_learned_conditioning(prompts, **size)
            eps16_unet = model.apply_model(x, t, cond32)  # the same fp32 conditioning, cast inside: UNet error only
            eps16_full = model.apply_model(x, t, cond16)
        loss16, grad16 = prefix_grad()
        low = {"unet": error_stats(eps16_unet, eps32)}
        parts32 = our_text_parts(cond32)
        low |= {part: error_stats(v, parts32[part]) for part, v in our_text_parts(cond16).items()}
        low |= {
            "text_and_unet": error_stats(eps16_full, eps32),
            "apl_loss": error_stats(loss16.reshape(1), loss32.reshape(1)),
            "prefix_grad": error_stats(grad16, grad32),
        }
        res = {
            "input": {"batch": 2, "t": t.tolist(), "latent_hw": hw, "family": self.family},
            "fp32_ours_vs_diffusers": vs_ref,
            f"{a.precision}_vs_fp32": low,
            "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
        }
        self.results["numerics"] = res
        self.save()
        print("  fp32 ours vs diffusers: " + ", ".join(f"{k} max abs {v['max_abs']:.2e}" for k, v in vs_ref.items())
              + f"; {a.precision} vs fp32: UNet rel {low['unet']['rel_l2']:.2e}, text+UNet rel "
              f"{low['text_and_unet']['rel_l2']:.2e}, prefix grad cos {low['prefix_grad']['cosine']:.4f}", flush=True)
