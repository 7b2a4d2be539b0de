"""Masked-diffusion likelihood estimators and samplers over a denoiser callable."""
