"""Model-independent evaluation: face identity similarity, CLIP score and FID."""
