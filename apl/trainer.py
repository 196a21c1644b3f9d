"""APL training: learn the `alz` prefix so identity prompts aim at anonymous attributes and others stay put.

Per step (SPEC §4): z_t = q_sample(z_0, t, noise); eps_n = UNet(z_t, t, text(neutral)) without grad;
eps_p = UNet(z_t, t, text(private, prefix)) with grad; target = eps_n - g * (sg(eps_p) - eps_n);
loss = MSE(eps_p, target). The original ran a third UNet pass for sg(eps_p); it equals the detached grad pass.
Only the prefix is trained (Adam). Data parallelism: Lightning Fabric processes, gradients averaged by all-reduce.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from apl.fingerprint import module_fingerprint
from apl.images import SkipReport
from apl.io import atomic_save
from apl.people import NO_PHRASE_PROB
from apl.run_dir import (
    TRAJECTORY_SETTINGS,
    RunLock,
    check_foreign_resume,
    check_outdir,
    describe_run,
    move_run_aside,
    record_differences,
    refuse_other_run,
    remove_run_temporaries,
    run_files,
    run_record,
)
from apl.runtime import DEFAULT_CKPT, UsageError, is_tiny, load_model_for_cli, native_image_size, pick_dtype
from apl.step import REFERENCES, StaticStep
from apl.train_data import DEFAULT_PROMPTS_FILE, clean_latents, plan_batch, prepare_data, step_noise
from apl.train_log import TrainLog
from ldm.modules.embedding_manager import INITS, check_vectors
from ldm.modules.prefix import is_multi_encoder, make_prefix, tokenize_prompts

STATE_VERSION = 1


@dataclass
class TrainConfig:
    # --- flags of the original APL/ESD train.py ---
    prompt: str = "APL"  # run name: embeddings/<prompt>-<step>.pt
    train_method: str = "prefix"  # recorded in the metadata; APL trains only the prefix
    start_guidance: float = 3.0  # CFG scale for the self-generated general samples
    negative_guidance: float = 1.0  # g in target = eps_n - g * (sg(eps_p) - eps_n)
    iterations: int = 1000
    lr: float = 1e-3
    config_path: str = "configs/stable-diffusion/v1-inference.yaml"
    ckpt_path: str | None = DEFAULT_CKPT
    diffusers_config_path: str | None = None  # set: also export the prefix in diffusers format
    devices: str | None = None  # GPU ids "0,1" (data-parallel); unset: GPU 0, or one CPU process without CUDA
    seperator: str | None = None  # accepted for command-line compatibility (ESD multi-word runs)
    image_size: int | None = None  # unset: the model's native size (its config's latent size x 8)
    ddim_steps: int = 50  # DDIM steps for self-generated general samples
    # --- data ---
    face_dir: str = "data/face"
    general_dir: str | None = None
    general_source: str = "auto"  # auto | images | generated
    people_file: str = "people.tsv"
    templates_file: str = "templates.txt"
    prompts_file: str = DEFAULT_PROMPTS_FILE
    max_general: int | None = None
    id_ratio: float = 0.5
    id_target: str = "attributes"  # attributes | empty
    no_phrase_prob: float = NO_PHRASE_PROB  # identity prompts without an opening phrase ("A photo of ", ...)
    reference: str = "prefix"  # what g pushes away from: the prefix's own prediction (original) | the named person
    # --- run ---
    batch_size: int = 1  # per device
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16 | fp16: frozen weights
    seed: int = 42
    save_every: int = 500
    plot_every: int = 50
    log_every: int = 1  # host syncs (NaN check, log, progress) every N steps; 10+ keeps a GPU step sync-free
    outdir: str = "outputs/APL"
    resume: str | None = None  # path to train_state.pt, or "auto" (outdir/train_state.pt)
    num_vectors: int = 10
    placeholder: str = "alz"
    init: str = "uniform"  # the prefix's start: uniform [0, 1) (original) | normal (token-embedding statistics)
    init_word: str | None = None
    cache_dir: str = "cache"
    gradient_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"  # torch.compile mode; "reduce-overhead" adds CUDA graphs
    cuda_graph: bool = False  # capture the step's device work once in a CUDA graph and replay it (GPU)
    channels_last: bool = False  # UNet activations and conv weights in NHWC memory (GPU tensor cores)
    accelerator: str = "auto"  # auto | cuda | cpu
    cpu_processes: int = 1  # data-parallel CPU processes (gloo); --devices is for GPU ids only
    num_nodes: int = 1
    start_over: bool = False  # move an earlier run in --outdir aside to <outdir>/previous-runs/<time>/
    progress: bool = True


def _parse_devices(cfg: TrainConfig) -> tuple[str, list[int] | int]:
    """(accelerator, devices) for Fabric. --devices names GPU ids only; CPU processes are --cpu_processes."""
    accel = cfg.accelerator
    if accel not in ("auto", "cuda", "cpu"):
        raise UsageError(f"--accelerator {cfg.accelerator!r}: choose auto, cuda or cpu")
    if accel == "auto":
        accel = "cuda" if torch.cuda.is_available() else "cpu"
    if accel == "cpu":
        if cfg.devices is not None:
            why = "this machine has no CUDA GPU" if cfg.accelerator == "auto" else "--accelerator cpu is set"
            raise UsageError(
                f"--devices {cfg.devices} names GPU ids, but {why}. To train on the CPU leave --devices out (one "
                "process), or pass --cpu_processes N for N data-parallel CPU processes"
            )
        return accel, cfg.cpu_processes
    if cfg.cpu_processes != 1:
        raise UsageError(
            f"--cpu_processes {cfg.cpu_processes} is for CPU training; on GPUs choose them with --devices, e.g. 0,1 "
            "(or pass --accelerator cpu)"
        )
    text = "0" if cfg.devices is None else str(cfg.devices)
    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"--devices {cfg.devices!r}: expected GPU ids like '0' or '0,1'") from None
    if not ids:
        raise UsageError("--devices is empty: give GPU ids like '0' or '0,1'")
    if len(set(ids)) != len(ids):
        raise UsageError(f"--devices {cfg.devices}: a GPU id is listed twice")
    n = torch.cuda.device_count()
    absent = [i for i in ids if i >= n or i < 0]
    if absent:
        have = f"GPUs 0..{n - 1}" if n else "no CUDA GPU"
        raise UsageError(
            f"--devices {cfg.devices}: GPU id(s) {absent} do not exist; this machine has {have}"
            " (check CUDA_VISIBLE_DEVICES, or use --accelerator cpu)"
        )
    return accel, ids


def make_fabric(cfg: TrainConfig):
    from lightning.fabric import Fabric

    accel, devices = _parse_devices(cfg)
    launched = any(k in os.environ for k in ("WORLD_SIZE", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"))
    if cfg.num_nodes > 1 and not launched:  # without a launcher, rank 0 would wait for the other nodes forever
        raise UsageError(
            f"--num_nodes {cfg.num_nodes} needs a multi-node launcher that starts one process per node and sets "
            "WORLD_SIZE/RANK/MASTER_ADDR (torchrun --nnodes, or SLURM's srun); none is set here"
        )
    n = len(devices) if isinstance(devices, list) else devices
    strategy = "ddp" if n * cfg.num_nodes > 1 else "auto"
    return Fabric(accelerator=accel, devices=devices, strategy=strategy, num_nodes=cfg.num_nodes, precision="32-true")


def _check_range(flag: str, value: float, lo: float, hi: float, why: str = "", lo_open: bool = False) -> None:
    """A finite number in [lo, hi] (or (lo, hi] with lo_open); one UsageError naming the flag otherwise."""
    inside = math.isfinite(value) and (lo < value if lo_open else lo <= value) and value <= hi
    if not inside:
        span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise UsageError(f"--{flag} {value}: must be a finite number in {span}{f' ({why})' if why else ''}")


def _check_config(cfg: TrainConfig) -> None:
    _check_range("id_ratio", cfg.id_ratio, 0.0, 1.0, "the probability of an identity sample")
    _check_range("lr", cfg.lr, 0.0, 10.0, "larger steps move the prefix beyond any text embedding", lo_open=True)
    _check_range(
        "negative_guidance",
        cfg.negative_guidance,
        -1.0,
        1e3,
        "at -1 the target equals the prefix's own prediction and nothing trains; below it the objective reverses",
        lo_open=True,
    )
    _check_range("start_guidance", cfg.start_guidance, 0.0, 100.0, "classifier-free guidance scale")
    if not 0 <= cfg.seed < 2**32:
        raise UsageError(f"--seed {cfg.seed}: must be in [0, 2**32)")
    _check_range("no_phrase_prob", cfg.no_phrase_prob, 0.0, 1.0, "the probability of no opening phrase")
    if cfg.reference not in REFERENCES:
        raise UsageError(f"--reference {cfg.reference!r}: choose {' or '.join(REFERENCES)}")
    if cfg.reference == "name" and cfg.negative_guidance < 0:
        raise UsageError(
            f"--negative_guidance {cfg.negative_guidance} with --reference name would pull the prefix towards the "
            "named person; use g >= 0"
        )
    if cfg.init not in INITS:
        raise UsageError(f"--init {cfg.init!r}: choose {' or '.join(INITS)}")
    if cfg.init_word and cfg.init != "uniform":
        raise UsageError("--init_word and --init exclude each other: the word's embedding is the start")
    if cfg.id_target not in ("attributes", "empty"):
        raise UsageError(f"--id_target {cfg.id_target!r}: choose attributes or empty")
    if cfg.general_source not in ("auto", "images", "generated"):
        raise UsageError(f"--general_source {cfg.general_source!r}: choose auto, images or generated")
    if cfg.image_size is not None and (cfg.image_size % 8 or not 8 <= cfg.image_size <= 4096):
        raise UsageError(f"--image_size {cfg.image_size}: must be a positive multiple of 8, at most 4096")
    if not 1 <= cfg.ddim_steps <= 500:
        raise UsageError(f"--ddim_steps {cfg.ddim_steps}: must be in 1..500 (DDIM over 1000 training timesteps)")
    if not 1 <= cfg.num_vectors <= 64:
        raise UsageError(
            f"--num_vectors {cfg.num_vectors}: must be in 1..64 (the vectors take that many of CLIP's 75 prompt "
            "positions)"
        )
    if cfg.max_general is not None and cfg.max_general < 1:
        raise UsageError(f"--max_general {cfg.max_general}: must be >= 1 (leave it out to use every general sample)")
    if cfg.cuda_graph and cfg.compile:
        raise UsageError(
            "--cuda_graph and --compile exclude each other; for CUDA graphs with torch.compile use "
            "--compile --compile_mode reduce-overhead"
        )
    if min(cfg.iterations, cfg.batch_size, cfg.save_every, cfg.log_every, cfg.plot_every) < 1:
        raise UsageError("--iterations, --batch_size, --save_every, --log_every and --plot_every must be >= 1")
    if cfg.cpu_processes < 1 or cfg.num_nodes < 1:
        raise UsageError("--cpu_processes and --num_nodes must be >= 1")


class NonFiniteLoss(RuntimeError):
    """A NaN/inf loss or gradient; carries the last prefix with a finite loss and its completed-step count."""

    def __init__(self, message: str, last_good: list, last_good_step: int) -> None:
        super().__init__(message)
        self.last_good, self.last_good_step = last_good, last_good_step


def _state_path(cfg: TrainConfig) -> Path:
    return Path(cfg.outdir) / "train_state.pt"


def save_state(
    path: Path, step: int, em, opt, cfg: TrainConfig, scaler=None, world_size: int = 1, record: dict | None = None
) -> None:
    state = {
        "version": STATE_VERSION,
        "step": step,
        "world_size": world_size,
        "prefix": {k: v.detach().cpu().clone() for k, v in em.string_to_param_dict.items()},
        "optimizer": opt.state_dict(),
        "config": asdict(cfg),
    }
    if record is not None:
        state["run"] = record  # settings and content digests: what --resume compares
    if scaler is not None:
        state["loss_scaler"] = scaler.state_dict()
    atomic_save(lambda p: torch.save(state, p), path)


def read_state(path: Path) -> dict:
    """A train_state.pt as a dict, or one UsageError saying why it is not one."""
    not_state = (
        f"--resume: {path} is not a training state (train_state.pt, written next to embeddings/ every "
        "--save_every steps); a prefix file cannot be resumed from"
    )
    if not path.is_file():
        raise UsageError(f"--resume: no training state at {path} (it is written every --save_every steps)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # damaged or foreign file: say which and why (not torch's advice to unpickle it)
        raise UsageError(f"{not_state} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not {"step", "prefix", "optimizer"} <= state.keys():
        raise UsageError(not_state)
    return state


def check_state(state: dict, path: Path, cfg: TrainConfig, world_size: int, precision: str | None = None) -> None:
    """Refuse to resume a state of another run: process count and every trajectory setting (run_dir.py); the data
    and model digests are compared later, once the data is prepared (`check_record`)."""
    saved_world = int(state.get("world_size", world_size))
    if saved_world != world_size:
        raise UsageError(
            f"--resume: {path} was trained by {saved_world} process(es), this run has {world_size}; the global batch "
            "(processes x --batch_size) must stay the same to continue the same run"
        )
    old = dict(state.get("run", {}).get("settings") or state.get("config") or {})
    now = {k: getattr(cfg, k) for k in TRAJECTORY_SETTINGS if hasattr(cfg, k)}
    if precision is not None:
        now["precision"] = precision
    if "run" not in state:  # a state from before run records: its resolved precision is unknown
        old.pop("precision", None)
    diffs = record_differences({"settings": old}, {"settings": now})
    if diffs:
        raise refuse_other_run(path, diffs)
    for name, vectors in state["prefix"].items():
        if not isinstance(vectors, torch.Tensor):
            raise UsageError(f"--resume: {path} holds no vectors for {name!r}; it is damaged")
        try:
            check_vectors(vectors, f"--resume: {path}: prefix {name!r}", "resume from an earlier copy or start over")
        except ValueError as e:
            raise UsageError(str(e)) from None


def check_record(state: dict, path: Path, record: dict) -> None:
    """The saved run record against this run's (settings, face set, general set, texts, model, width)."""
    old = state.get("run")
    if old is None:
        print(
            f"warning: {path} was written before run records; its face set and model could not be compared with "
            "this run's (the settings were)"
        )
        return
    diffs = record_differences(old, record)
    if diffs:
        raise refuse_other_run(path, diffs)


def restore_state(state: dict, path: Path, em, opt, cfg: TrainConfig, scaler=None) -> int:
    """Copy prefix, Adam (with this run's --lr) and loss scaler from a checked state; returns its step."""
    for name, vectors in state["prefix"].items():
        if name not in em.string_to_param_dict:
            raise UsageError(f"--resume: {path} trains placeholder {name!r}, this run {list(em.string_to_param_dict)}")
        have = tuple(em.string_to_param_dict[name].shape)
        if tuple(vectors.shape) != have:
            raise UsageError(
                f"--resume: {path} holds {tuple(vectors.shape)} vectors for {name!r}, this run {have} (another "
                "--num_vectors or another model's text width); resume with the same model and settings"
            )
    with torch.no_grad():
        for k, v in state["prefix"].items():
            em.string_to_param_dict[k].copy_(v)
    opt.load_state_dict(state["optimizer"])
    old_lr = opt.param_groups[0]["lr"]
    for group in opt.param_groups:  # the saved state carries the old learning rate; this run's --lr applies
        group["lr"] = cfg.lr
    if old_lr != cfg.lr:
        print(f"note: --lr {cfg.lr:g} applies from here on (the state was trained with {old_lr:g})")
    if scaler is not None and "loss_scaler" in state:
        scaler.load_state_dict(state["loss_scaler"])
    return int(state["step"])


def load_state(path: Path, em, opt, cfg: TrainConfig, scaler=None, world_size: int = 1) -> int:
    """Read, check and restore a train_state.pt (settings only; see check_record for the data); returns its step."""
    state = read_state(path)
    check_state(state, path, cfg, world_size)
    return restore_state(state, path, em, opt, cfg, scaler)


def _check_window(window: list, last_good: list, last_good_step: int) -> tuple[list, int]:
    """One host sync for a window of steps: stop at the first non-finite step, else advance the last good prefix.

    The last good prefix is the one the last finite step of the window ran with (its loss was finite)."""
    flags = torch.stack([w[4] for w in window]).cpu().tolist()
    for (step, _, t_all, all_loss, _, before, _), ok in zip(window, flags, strict=True):
        if not ok:
            raise NonFiniteLoss(
                f"loss or gradient became non-finite at step {step + 1} "
                f"(loss {all_loss.cpu().tolist()}, t {t_all.tolist()})",
                last_good,
                last_good_step,
            )
        last_good, last_good_step = before, step
    return last_good, last_good_step


def _log_window(window: list, log: TrainLog, bar, opt, G: int, seconds: float) -> None:
    """Write the window's per-step records and advance the progress bar."""
    losses = torch.stack([w[3] for w in window]).float().cpu()  # (k, G)
    gaps = torch.stack([w[6] for w in window]).float().cpu()  # (k, G)
    sps = G * len(window) / max(seconds, 1e-9)
    for (step, plan, t_all, *_), all_loss, all_gap in zip(window, losses, gaps, strict=True):
        kinds = [p.kind for p in plan]
        rec = {
            "step": step + 1,
            "loss": float(all_loss.mean()),
            # MSE(eps_p, eps_n): what the prefix still changes; unlike the loss it does not scale with g
            "gap": float(all_gap.mean()),
            "samples_per_s": round(sps, 3),
            "t": t_all.tolist(),
            "sample_loss": [round(float(v), 6) for v in all_loss],
            "kind": kinds,
            "lr": opt.param_groups[0]["lr"],
        }
        for kind in ("id", "general"):
            v = [float(l_) for l_, k in zip(all_loss, kinds, strict=True) if k == kind]
            rec[f"loss_{kind}"] = sum(v) / len(v) if v else None
            v = [float(g_) for g_, k in zip(all_gap, kinds, strict=True) if k == kind]
            rec[f"gap_{kind}"] = sum(v) / len(v) if v else None
        log.add(rec)
    bar.set_postfix(loss=f"{float(losses[-1].mean()):.4g}", samples_s=f"{sps:.2f}")
    bar.update(len(window))


def _mean_across_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """Average `t` over the processes, in place (torch.distributed directly: Lightning's all_reduce puts a barrier
    before every reduction, which blocks the host on a GPU)."""
    if world > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)  # gloo has no AVG
        t.div_(world)
    return t


def _gather_ranks(t: torch.Tensor, world: int) -> torch.Tensor:
    """(B,) per process -> (world * B,) in rank order."""
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _save_prefix(em, cfg: TrainConfig, step: int, tag: str | None = None) -> Path:
    emb_dir = Path(cfg.outdir) / "embeddings"
    stem = f"{cfg.prompt}-{step}" if tag is None else f"{cfg.prompt}-{tag}"
    base = Path(cfg.ckpt_path).name if cfg.ckpt_path and not is_tiny(cfg.config_path) else Path(cfg.config_path).name
    em.save(emb_dir / f"{stem}.pt", step=step, base_model=base)
    em.save(emb_dir / f"{stem}.safetensors", step=step, base_model=base)
    if cfg.diffusers_config_path:
        em.export_diffusers(emb_dir / f"{stem}-diffusers.safetensors")
    return emb_dir / f"{stem}.pt"


def _resume_path(cfg: TrainConfig) -> Path | None:
    """The state to continue from: --resume PATH, or with 'auto' <outdir>/train_state.pt; None starts a new run
    ('auto' in a folder without any run, so that one command line serves the first start and every restart)."""
    if not cfg.resume:
        return None
    if cfg.resume != "auto":
        return Path(cfg.resume)
    path = _state_path(cfg)
    if path.is_file():
        return path
    outdir = Path(cfg.outdir)
    if run_files(outdir, cfg.prompt):
        raise UsageError(
            f"--resume auto: {outdir} holds {describe_run(outdir, cfg.prompt)} but no {path.name}: the run stopped "
            "before its first save (--save_every). Start it again with --start_over (moves those files aside)"
        )
    return None


def _claim_outdir(cfg: TrainConfig, fabric) -> RunLock | None:
    """One run per --outdir: refuse to overwrite or mix runs, lock the folder, clean up after killed saves, and
    with --start_over move the earlier run aside. Every rank checks; rank 0 locks and writes."""
    outdir = Path(cfg.outdir)
    problem = check_outdir(outdir, cfg.prompt, cfg.resume, cfg.start_over)
    if problem:
        raise UsageError(problem)
    lock, refusal = None, None
    if fabric.is_global_zero:
        lock = RunLock(outdir)
        refusal = lock.acquire()
    if fabric.world_size > 1:
        refusal = fabric.broadcast(refusal, src=0)
    if refusal:
        raise UsageError(refusal)
    if fabric.is_global_zero:
        removed = remove_run_temporaries(outdir, cfg.prompt)
        if removed:
            print(f"removed {len(removed)} temporary file(s) that an interrupted save left: {removed[0].name} ...")
        if cfg.start_over:
            moved = move_run_aside(outdir, cfg.prompt)
            if moved:
                print(f"--start_over: the earlier run's files are now in {moved}")
    fabric.barrier()
    return lock


def train(cfg: TrainConfig) -> Path:
    """Run training; returns the path of the final `.pt` prefix."""
    _check_config(cfg)
    if cfg.image_size is None:  # SD v1 512, SDXL 1024, the tiny and toy models 64
        cfg = replace(cfg, image_size=native_image_size(cfg.config_path))
    fabric = make_fabric(cfg)
    fabric.launch()
    lock = _claim_outdir(cfg, fabric)
    # SIGTERM (a scheduler's preemption, `kill`, a closing terminal) stops like Ctrl-C: the state of the completed
    # steps is saved first, so --resume auto continues exactly.
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if on_main_thread else None
    try:
        return _train(cfg, fabric)
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous)
        if lock is not None:
            lock.release()


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _train(cfg: TrainConfig, fabric) -> Path:

    device = fabric.device
    if cfg.cuda_graph and device.type != "cuda":
        raise UsageError(f"--cuda_graph needs a CUDA GPU; this run is on {device.type} (leave --cuda_graph out)")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    resume_path = _resume_path(cfg)
    state = None
    if resume_path is not None:  # settings first: a wrong --resume fails before any model or data is loaded
        state = read_state(resume_path)
        foreign = check_foreign_resume(Path(cfg.outdir), cfg.prompt, resume_path)
        if foreign:
            raise UsageError(foreign)
        check_state(state, resume_path, cfg, fabric.world_size, precision)
    elif cfg.resume and fabric.is_global_zero:
        print(f"--resume auto: no earlier run in {cfg.outdir}; starting a new one")
    model = load_model_for_cli(cfg.config_path, cfg.ckpt_path, device, pick_dtype(precision, device), cfg.seed)
    try:
        model.check_image_size(cfg.image_size, cfg.image_size)
    except ValueError as e:
        raise UsageError(f"--image_size {cfg.image_size}: {e}") from None
    if cfg.gradient_checkpointing:
        model.model.diffusion_model.set_gradient_checkpointing(True)
    if cfg.channels_last:
        model.model.diffusion_model.set_channels_last(True)
    if cfg.compile:
        model.model.diffusion_model = torch.compile(model.model.diffusion_model, mode=cfg.compile_mode)
    em = make_prefix(  # one EmbeddingManager per text encoder (SD v1: one; SDXL: CLIP ViT-L and OpenCLIP bigG)
        model, cfg.placeholder, cfg.num_vectors, cfg.init_word, torch.Generator().manual_seed(cfg.seed), cfg.init
    ).to(device)
    with torch.no_grad():  # the seeded init is the same everywhere; rank 0's copy makes sure of it
        for p in em.embedding_parameters():
            p.copy_(fabric.broadcast(p.detach(), src=0))
    opt = torch.optim.Adam(em.embedding_parameters(), lr=cfg.lr)
    # fp16 gradients of the loss (a mean over 16k latent values) fall below fp16's range and flush to zero: scale
    # the loss up before backward, unscale the prefix gradients (fp32) before Adam. An overflowing step is skipped
    # and the scale halved (torch.amp.GradScaler); bf16 has fp32's range and needs none of this.
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**16) if precision == "fp16" else None
    skipped = 0
    report = SkipReport()
    data = prepare_data(cfg, model, fabric, report)
    record = run_record(cfg, data, module_fingerprint(model), em.token_dim, precision)
    data = data.to(device)  # latents live on the device: no per-step copies
    rank0 = fabric.is_global_zero
    if rank0:
        print(
            f"APL training: {data.describe()}; {fabric.world_size} process(es) x batch {cfg.batch_size}; "
            f"weights {precision}, prefix fp32; {'tiny random model' if is_tiny(cfg.config_path) else cfg.ckpt_path}"
        )
        if report:
            print(report.summary())
        for note in data.notes:
            print(f"note: {note}")

    start = 0
    if state is not None:
        check_record(state, resume_path, record)
        start = restore_state(state, resume_path, em, opt, cfg, scaler)
        if start >= cfg.iterations:
            raise UsageError(
                f"--resume: {resume_path} is at step {start} already; --iterations is the total number of steps "
                f"({cfg.iterations}): raise it to train further"
            )
        if rank0:
            print(f"resumed from step {start}")
    log = TrainLog(cfg.outdir, start) if rank0 else None
    world, rank, B = fabric.world_size, fabric.global_rank, cfg.batch_size
    G = world * B
    shape = (model.channels, cfg.image_size // 8, cfg.image_size // 8)
    # The step's device work (text encoding, two UNet passes, loss, backward) on static buffers; with --cuda_graph
    # it is captured once and replayed. Token ids: the tokenizer caches whole prompts, so a step rarely runs BPE.
    # SDXL's size conditioning says the image is image_size x image_size, uncropped (SD v1 has none).
    sizes = {"target_size": (cfg.image_size, cfg.image_size)} if is_multi_encoder(model) else None
    device_step = StaticStep(
        model, em, B, shape, cfg.negative_guidance, graph=cfg.cuda_graph, scaler=scaler, reference=cfg.reference,
        cond_kwargs=sizes,
    )  # fmt: skip
    tokenize = partial(tokenize_prompts, model)  # (B, 77) ids, or one (B, 77) per text encoder (SDXL)
    bar = tqdm(total=cfg.iterations, initial=start, desc="APL", unit="step", disable=not (rank0 and cfg.progress))
    # The prefix that last gave a finite loss, and its number of completed steps (restored on a NaN/inf).
    last_good, last_good_step = [p.detach().clone() for p in em.embedding_parameters()], start
    window: list = []  # steps since the last host sync (see --log_every)
    completed = start  # optimizer steps taken: what a saved state and prefix file are labelled with
    final = None
    t_last = time.perf_counter()

    def flush() -> None:
        """The host sync of a window: NaN check (raises NonFiniteLoss), log records, progress bar, plot."""
        nonlocal window, last_good, last_good_step, t_last
        pending, window = window, []
        if not pending:
            return
        last_good, last_good_step = _check_window(pending, last_good, last_good_step)
        if rank0:
            _log_window(pending, log, bar, opt, G, time.perf_counter() - t_last)
            if completed // cfg.plot_every > (completed - len(pending)) // cfg.plot_every:
                log.plot(Path(cfg.outdir) / "loss.png")
        t_last = time.perf_counter()

    try:
        try:
            for step in range(start, cfg.iterations):
                plan = plan_batch(
                    data, step, cfg.seed, G, cfg.id_ratio, cfg.placeholder, cfg.id_target, cfg.no_phrase_prob
                )
                t_all, noise_all, vae_noise_all = step_noise(cfg.seed, step, G, shape, model.num_timesteps)
                mine = slice(rank * B, (rank + 1) * B)
                mplan = plan[mine]
                z0 = clean_latents(data, mplan, vae_noise_all[mine], model.scale_factor)
                private_ids, neutral_ids = tokenize([p.private for p in mplan]), tokenize([p.neutral for p in mplan])
                reference_ids = tokenize([p.reference for p in mplan]) if cfg.reference == "name" else None
                device_step.load(z0, t_all[mine], noise_all[mine], private_ids, neutral_ids, reference_ids)
                static_loss, static_grads = device_step.run()  # overwritten by the next run: clone what is kept
                for p, grad in zip(em.embedding_parameters(), static_grads, strict=True):
                    p.grad = _mean_across_ranks(grad, world)  # in place on the static gradient: used up below
                # Everything below stays on the device until the next check: no host sync inside a window.
                all_loss = _gather_ranks(static_loss.clone(), world)  # (G,) in plan order
                all_gap = _gather_ranks(device_step.gap.clone(), world)
                checks = [torch.isfinite(all_loss).all()]
                if scaler is None:  # with loss scaling, an overflowing gradient only skips the step (below)
                    checks += [torch.isfinite(p.grad).all() for p in em.embedding_parameters()]
                finite = torch.stack(checks).all()
                before = [p.detach().clone() for p in em.embedding_parameters()]  # the prefix this step ran with
                if scaler is None:
                    opt.step()
                else:  # fp16: GradScaler reads its overflow flag on the host, one sync per step
                    old_scale = scaler.get_scale()
                    scaler.step(opt)
                    scaler.update()
                    scale = scaler.get_scale()
                    skipped += scale < old_scale
                completed = step + 1
                window.append((step, plan, t_all, all_loss, finite, before, all_gap))
                if scaler is not None and scale < 1.0:
                    raise NonFiniteLoss(
                        f"fp16 gradients overflowed at every loss scale down to {scale:g} "
                        f"(step {completed}, {skipped} steps skipped)",
                        last_good,
                        last_good_step,
                    )
                save_now = completed % cfg.save_every == 0 or completed == cfg.iterations
                if completed % cfg.log_every == 0 or save_now:
                    flush()
                if save_now:
                    if rank0:
                        final = _save_prefix(em, cfg, completed)
                        save_state(_state_path(cfg), completed, em, opt, cfg, scaler, world, record)
                    fabric.barrier()
        except KeyboardInterrupt:
            flush()  # the steps since the last sync are checked and logged too (a NaN among them: handled below)
            if rank0:
                bar.close()
                save_state(_state_path(cfg), completed, em, opt, cfg, scaler, world, record)
                path = _save_prefix(em, cfg, completed)
                print(f"\ninterrupted: state after {completed} steps saved; continue with --resume auto ({path})")
            raise
    except NonFiniteLoss as e:
        last_good, last_good_step = e.last_good, e.last_good_step
        tag = f"{last_good_step}-last-good"
        if rank0:
            with torch.no_grad():
                for p, good in zip(em.embedding_parameters(), last_good, strict=True):
                    p.copy_(good)
            _save_prefix(em, cfg, last_good_step, tag=tag)
            log.plot(Path(cfg.outdir) / "loss.png")
            bar.close()
        fabric.barrier()  # every rank stops at the same step; rank 0 saves before any of them exits
        raise UsageError(
            f"{e}. Training stopped; the last prefix with a finite loss (after {last_good_step} steps) was saved as "
            f"{Path(cfg.outdir) / 'embeddings' / f'{cfg.prompt}-{tag}.pt'}. Try a lower --lr or --precision fp32/bf16."
        ) from None
    bar.close()
    if rank0:
        log.plot(Path(cfg.outdir) / "loss.png")
        if report:
            print(report.summary())
        for note in data.notes:
            print(f"note: {note}")
        if scaler is not None:
            print(f"fp16 loss scaling: {skipped} step(s) skipped for gradient overflow; scale {scaler.get_scale():g}")
        print(f"done: {cfg.iterations} steps; prefix {final}; log {log.path}; plot {Path(cfg.outdir) / 'loss.png'}")
    return Path(cfg.outdir) / "embeddings" / f"{cfg.prompt}-{cfg.iterations}.pt"
