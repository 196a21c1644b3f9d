"""Per-step JSONL log and the loss plot (per timestep bucket and smoothed) of a training run."""

from __future__ import annotations

import json
import os
from pathlib import Path

from apl.io import atomic_save
from ldm.util import SaveError, describe_save_failure

BUCKETS = ((0, 250), (250, 500), (500, 750), (750, 1000))


class TrainLog:
    """Appends one JSON object per step to `log.jsonl`; keeps what the plot needs in memory."""

    def __init__(self, outdir: str | os.PathLike, resume_step: int = 0) -> None:
        self.path = Path(outdir) / "log.jsonl"
        self.records: list[dict] = []
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
                if rec.get("step", 0) <= resume_step:  # steps after the resumed state are redone
                    kept.append(rec)
            self.records = kept
            atomic_save(lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)), self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, record: dict) -> None:
        self.records.append(record)
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:  # a full disk: name the file (a cut last line is skipped when the log is read back)
            raise SaveError(describe_save_failure(self.path, e, existed=True)) from e

    def plot(self, path: str | os.PathLike, title: str = "APL training loss") -> None:
        """Loss per step (raw + EMA) and per timestep bucket (EMA over the samples in each bucket)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        if not self.records:
            return
        steps = [r["step"] for r in self.records]
        loss = [r["loss"] for r in self.records]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
        ax1.plot(steps, loss, color="0.8", lw=0.8, label="loss")
        ax1.plot(steps, _ema(loss), color="C0", lw=1.5, label="smoothed (EMA 0.95)")
        for kind, color in (("loss_id", "C3"), ("loss_general", "C2")):
            pts = [(r["step"], r[kind]) for r in self.records if r.get(kind) is not None]
            if pts:
                ax1.plot([s for s, _ in pts], _ema([v for _, v in pts]), color=color, lw=1, label=f"{kind} (EMA)")
        gap = [(r["step"], r["gap"]) for r in self.records if r.get("gap") is not None]
        if gap:  # MSE(eps_p, eps_n): the same scale whatever --negative_guidance is
            ax1.plot([s for s, _ in gap], _ema([v for _, v in gap]), color="C1", lw=1, ls="--", label="gap (EMA)")
        ax1.set(xlabel="step", ylabel="MSE", title=title, yscale="log")
        ax1.legend(fontsize=8)
        for i, (lo, hi) in enumerate(BUCKETS):
            pts = [
                (r["step"], v)
                for r in self.records
                for t, v in zip(r["t"], r["sample_loss"], strict=False)
                if lo <= t < hi
            ]
            if pts:
                ax2.plot(
                    [s for s, _ in pts],
                    _ema([v for _, v in pts], 0.9),
                    color=f"C{i}",
                    lw=1.2,
                    label=f"t in [{lo}, {hi})",
                )
        ax2.set(xlabel="step", ylabel="per-sample MSE (EMA)", title="by timestep bucket", yscale="log")
        ax2.legend(fontsize=8)
        fig.tight_layout()
        atomic_save(lambda p: fig.savefig(p, dpi=90), path)
        plt.close(fig)


def _ema(values: list[float], beta: float = 0.95) -> list[float]:
    out, m = [], None
    for v in values:
        m = v if m is None else beta * m + (1 - beta) * v
        out.append(m)
    return out
