"""Defaults the evaluation scripts show in --help, kept free of heavy imports so that parsing flags is instant."""

from __future__ import annotations

DEFAULT_TEMPLATE = "A close-up portrait of {name}"  # the original APL's identity prompt (also a training prompt)
DEFAULT_PROMPTS = "prompts_person.txt"  # ships with the repository: everyday captions of people
DEFAULT_CLIP_MODEL = "ViT-g-14"  # what the original APL scored with
DEFAULT_CLIP_PRETRAINED = "laion2b_s34b_b88k"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_ENV = "APL_INCEPTION_WEIGHTS"

# Verification thresholds on cosine similarity per face backend; apl/eval/id_metrics.py explains the values.
DEFAULT_ID_THRESHOLDS: dict[str, float] = {"insightface": 0.32, "dlib": 0.91}

# Face detector settings of the InsightFace backend (the original APL's); other backends may ignore them.
DEFAULT_DET_THRESH = 0.5
DEFAULT_DET_SIZE = 256

# Artefacts SD v1 tends to draw in portraits; guidance pushes away from them (the original used such a prompt).
DEFAULT_NEGATIVE_PROMPT = (
    "blurry, lowres, low quality, jpeg artifacts, deformed, disfigured, distorted face, bad anatomy, "
    "extra limbs, extra fingers, mutated hands, cropped, out of frame, watermark, text, signature, cartoon, drawing"
)

DEFAULT_BOOTSTRAP = 1000  # resamples for the 95 % intervals
DEFAULT_KID_SUBSETS = 100  # as torchmetrics' KernelInceptionDistance
DEFAULT_KID_SUBSET_SIZE = 1000
