"""Training data: the per-step plan and noise depend on (seed, step) only; the posterior sample of cached moments."""

from __future__ import annotations

import random

import torch

from apl.train_data import PlannedSample, TrainData, clean_latents, plan_batch, step_noise


def _data():
    g = torch.Generator().manual_seed(0)
    return TrainData(
        face_latents=torch.randn(3, 8, 4, 4, generator=g), face_names=["Tom Hanks", "Emma Watson", "Tom Hanks"],
        general_latents=torch.randn(5, 4, 4, 4, generator=g), general_captions=[f"a cat {i}" for i in range(5)],
        people={"Tom Hanks": "a male person.", "Emma Watson": "a female person."}, templates=["in a park", "smiling"],
    )


def test_plan_and_noise_depend_on_seed_and_step_only():
    data = _data()

    def key(plan):
        return [(p.kind, p.index, p.private, p.neutral) for p in plan]

    plans = [key(plan_batch(data, s, 7, 8, 0.5)) for s in range(6)]
    random.seed(123)  # the global RNG states must not matter
    torch.manual_seed(123)
    assert [key(plan_batch(data, s, 7, 8, 0.5)) for s in range(6)] == plans
    assert len({str(p) for p in plans}) == 6  # every step draws its own batch
    assert key(plan_batch(data, 0, 8, 8, 0.5)) != plans[0]  # and every seed
    noises = [step_noise(7, s, 4, (4, 4, 4)) for s in range(3)]
    torch.manual_seed(999)
    again = [step_noise(7, s, 4, (4, 4, 4)) for s in range(3)]
    for a, b in zip(noises, again, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(noises[0][1], noises[1][1]) and not torch.equal(noises[0][2], noises[1][2])


def test_clean_latents_reparameterisation():
    data = _data()
    mean = torch.randn(3, 4, 4, 4)
    logvar = torch.full((3, 4, 4, 4), 2 * torch.log(torch.tensor(2.0)).item())  # std 2, var 4
    data.face_latents = torch.cat([mean, logvar], 1)
    plan = [PlannedSample(kind, i, "", "", "") for kind, i in (("id", 2), ("general", 4), ("id", 0))]
    eps = torch.randn(3, 4, 4, 4)
    z = clean_latents(data, plan, eps, 0.18215)
    torch.testing.assert_close(z[0], 0.18215 * (mean[2] + 2.0 * eps[0]))
    torch.testing.assert_close(z[2], 0.18215 * (mean[0] + 2.0 * eps[2]))
    torch.testing.assert_close(z[1], data.general_latents[4])


def test_no_phrase_probability_and_the_name_reference():
    """Identity prompts open without a phrase with probability --no_phrase_prob (the original: 4 of 8 strings
    empty, 0.5); the ESD-style reference is the private prompt without the placeholder, the caption for general."""
    data = _data()
    for p in (0.0, 0.5, 1.0):
        ids = [s for step in range(300) for s in plan_batch(data, step, 1, 8, 1.0, no_phrase_prob=p)]
        bare = sum(s.private.startswith(("alz Tom Hanks", "alz Emma Watson")) for s in ids) / len(ids)
        assert abs(bare - p) < 0.05, (p, bare)
    for s in plan_batch(data, 0, 1, 16, 0.5):
        want = s.private.removeprefix("alz ") if s.kind == "id" else s.neutral
        assert s.reference == want and "alz" not in s.reference


def test_make_room_for_prefix_cuts_long_captions_and_refuses_long_identity_prompts():
    import pytest

    from apl.datasets import GeneralSample
    from apl.runtime import UsageError
    from apl.train_data import make_room_for_prefix
    from ldm.modules.encoders.tokenizer import CLIPTokenizer

    tok = CLIPTokenizer()
    long = " ".join(f"word{i}" for i in range(80))
    general = [GeneralSample(None, "a red car"), GeneralSample(None, long)]
    fitted, notes = make_room_for_prefix(general, {"Tom Hanks": "A male person."}, ["in a park"], tok, 10)
    assert fitted[0].caption == "a red car" and long.startswith(fitted[1].caption)
    assert len(tok.encode(fitted[1].caption)) <= 65 < len(tok.encode(fitted[1].caption + " word99"))
    assert len(notes) == 1 and "1 general caption(s)" in notes[0]
    with pytest.raises(UsageError, match="identity prompt"):
        make_room_for_prefix([], {"Tom Hanks": "A male person."}, [long], tok, 10)
