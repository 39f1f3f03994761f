"""Evaluation: the paper's protocol (degrade ground truth, super-resolve, PSNR/SSIM against baselines)."""
