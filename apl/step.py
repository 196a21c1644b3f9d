"""The APL loss, and one training step's device work on static buffers (capturable once in a CUDA graph).

`StaticStep` owns fixed input buffers (z_0, t, noise, token ids of both prompts) and fixed outputs (per-sample
loss, prefix gradients). `run()` computes, from whatever the inputs hold, q_sample, both text encodings (prefix
inserted), the no-grad and the grad UNet pass, the APL loss and its backward. With `graph=True` (CUDA only) the
first `run()` warms up on a side stream and captures all of that in one `torch.cuda.CUDAGraph`; every later
`run()` is a single replay: no Python, no kernel launches one by one, no host sync. Without a graph the same body
runs eagerly and its results are copied into the same outputs, so callers see identical aliasing either way:
the outputs are overwritten by the next `run()`; clone what you keep.

Not inside the step (and so free to change between steps): the optimizer update, the gradient all-reduce of data
parallelism, the NaN checks, tokenisation and the gather of the planned latents. The prefix parameters must be
updated in place (Adam does); replacing the tensor objects would leave the graph reading the old ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.util import staged

REFERENCES = ("prefix", "name")

TextIds = torch.Tensor | dict[int, torch.Tensor]  # (B, 77), or one (B, 77) per text encoder (SDXL)


def _ids_like(ids: TextIds, batch: int, device: torch.device) -> TextIds:
    """Static (batch, L) id buffers of the same structure as `ids`, on `device`."""
    if isinstance(ids, Mapping):
        return {k: torch.zeros((batch, v.shape[-1]), dtype=torch.long, device=device) for k, v in ids.items()}
    return torch.zeros((batch, ids.shape[-1]), dtype=torch.long, device=device)


def _ids_pairs(bufs: TextIds, values: TextIds) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, value) pairs of two id structures, which must match."""
    if isinstance(bufs, Mapping) != isinstance(values, Mapping) or (
        isinstance(bufs, Mapping) and bufs.keys() != values.keys()
    ):
        raise ValueError("StaticStep.load: token ids changed structure between steps")
    if isinstance(bufs, Mapping):
        return [(bufs[k], values[k]) for k in bufs]
    return [(bufs, values)]


def apl_terms(
    model,
    em,
    z_t: torch.Tensor,
    t: torch.Tensor,
    private: Sequence[str] | torch.Tensor,
    neutral: Sequence[str] | torch.Tensor,
    negative_guidance: float = 1.0,
    reference: Sequence[str] | torch.Tensor | None = None,
    cond_kwargs: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample APL loss (B,) and the gap MSE(eps_p, eps_n) (B,), which does not depend on g.

    One no-grad UNet pass on the neutral prompts, one grad pass with the prefix. The target pushes away from a
    reference by g: without `reference`, the original's detached prediction with the prefix (target = eps_n -
    g * (sg(eps_p) - eps_n); under Adam every g > -1 then trains the same prefix, see README); with `reference`
    (the private prompts without the placeholder, i.e. the named person), ESD's choice: one more no-grad pass,
    target = eps_n - g * (eps_ref - eps_n), so g pushes away from the identity. Prompts are strings or token ids
    (B, 77) on the model's device (SDXL: ids per text encoder, and `cond_kwargs` such as the target size)."""
    kw = dict(cond_kwargs or {})

    def cond(prompts, prefix=None):
        return model.get_learned_conditioning(prompts, embedding_manager=prefix, **kw)

    with torch.no_grad():
        eps_n = model.apply_model(z_t, t, cond(neutral)).float()
        eps_r = None if reference is None else model.apply_model(z_t, t, cond(reference))
    eps_p = model.apply_model(z_t, t, cond(private, em)).float()
    away = eps_p.detach() if eps_r is None else eps_r.float()
    target = eps_n - negative_guidance * (away - eps_n)
    loss = ((eps_p - target) ** 2).mean(dim=(1, 2, 3))
    gap = ((eps_p.detach() - eps_n) ** 2).mean(dim=(1, 2, 3))
    return loss, gap


def apl_loss(
    model,
    em,
    z_t: torch.Tensor,
    t: torch.Tensor,
    private: Sequence[str] | torch.Tensor,
    neutral: Sequence[str] | torch.Tensor,
    negative_guidance: float = 1.0,
    reference: Sequence[str] | torch.Tensor | None = None,
    cond_kwargs: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Per-sample APL loss (B,) of `apl_terms`."""
    return apl_terms(model, em, z_t, t, private, neutral, negative_guidance, reference, cond_kwargs)[0]


class StaticStep:
    """Static inputs -> (per-sample loss (B,), prefix gradients); see the module docstring.

    With `scaler` (fp16) the gradients are those of loss * scale; `scaler.step(optimizer)` unscales them."""

    def __init__(
        self,
        model,
        em,
        batch: int,
        latent_shape: tuple[int, int, int],
        negative_guidance: float = 1.0,
        graph: bool = False,
        warmup: int = 3,
        scaler: torch.amp.GradScaler | None = None,
        reference: str = "prefix",
        cond_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        device = model.device
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        if graph and warmup < 1:  # lazy state (cuBLAS handles, the loss scale tensor) must exist before capture
            raise ValueError(f"a CUDA graph needs warmup >= 1 eager runs before capture; got {warmup}")
        if graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph needs a CUDA device; the model is on {device}")
        self.model, self.em, self.g = model, em, negative_guidance
        self.params = list(em.embedding_parameters())
        self.use_graph, self.warmup, self.scaler = graph, warmup, scaler
        self.cond_kwargs = dict(cond_kwargs or {})
        self.device = device
        self.z0 = torch.zeros((batch, *latent_shape), device=device)
        self.noise = torch.zeros_like(self.z0)
        self.t = torch.zeros(batch, dtype=torch.long, device=device)
        # Token ids, (B, 77) or one (B, 77) per text encoder (SDXL): allocated by the first load, in its structure.
        self.private_ids: TextIds | None = None
        self.neutral_ids: TextIds | None = None
        # ESD-style reference: the private prompt without the placeholder (the named person), one more no-grad pass
        self.uses_reference = reference == "name"
        self.reference_ids: TextIds | None = None
        self.loss = torch.zeros(batch, device=device)
        self.gap = torch.zeros(batch, device=device)  # MSE(eps_p, eps_n) per sample: comparable across g
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.graph: torch.cuda.CUDAGraph | None = None

    def load(
        self,
        z0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        private_ids: TextIds,
        neutral_ids: TextIds,
        reference_ids: TextIds | None = None,
    ) -> None:
        """Copy one step's inputs into the static buffers (non-blocking: no host sync)."""
        if (reference_ids is None) == self.uses_reference:
            raise ValueError("StaticStep.load: reference_ids are needed exactly when the step uses reference='name'")
        if self.private_ids is None:
            B, dev = self.z0.shape[0], self.device
            self.private_ids, self.neutral_ids = _ids_like(private_ids, B, dev), _ids_like(neutral_ids, B, dev)
            self.reference_ids = None if reference_ids is None else _ids_like(reference_ids, B, dev)
        pairs = [(self.z0, z0), (self.t, t), (self.noise, noise)]
        for bufs, values in ((self.private_ids, private_ids), (self.neutral_ids, neutral_ids),
                             (self.reference_ids, reference_ids)):  # fmt: skip
            if values is not None:
                pairs += _ids_pairs(bufs, values)
        for buf, value in pairs:
            if value.shape != buf.shape:
                raise ValueError(f"StaticStep.load: got shape {tuple(value.shape)}, the buffer is {tuple(buf.shape)}")
            buf.copy_(staged(value, buf.device), non_blocking=True)

    def _body(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's device work: per-sample loss and gap (B,) after backward; gradients land in p.grad."""
        m = self.model
        z_t = m.q_sample(self.z0, self.t, self.noise)
        loss, gap = apl_terms(
            m, self.em, z_t, self.t, self.private_ids, self.neutral_ids, self.g, self.reference_ids, self.cond_kwargs
        )
        # With a GradScaler (fp16) the backward runs on loss * scale: the gradients come out scaled. The scale is a
        # device tensor that the scaler updates in place, so a captured graph reads the current one on each replay.
        (loss.mean() if self.scaler is None else self.scaler.scale(loss.mean())).backward()
        return loss.detach(), gap

    def _eager(self) -> None:
        for p in self.params:
            p.grad = None
        loss, gap = self._body()
        self.loss.copy_(loss)
        self.gap.copy_(gap)
        for buf, p in zip(self.grads, self.params, strict=True):
            buf.copy_(p.grad)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture stream (cuDNN/cuBLAS choose their kernels here)
            for _ in range(self.warmup):
                self._eager()
        torch.cuda.current_stream().wait_stream(side)
        for p in self.params:
            p.grad = None  # backward inside the capture then allocates the gradients from the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.loss, self.gap = self._body()
        self.grads = [p.grad for p in self.params]
        self.graph = graph

    def run(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Compute the step from the current inputs; returns the static (loss, grads), valid until the next run."""
        if not self.use_graph:
            self._eager()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        return self.loss, self.grads
