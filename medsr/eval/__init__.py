"""Evaluation: the paper's protocol (degrade ground truth, super-resolve, PSNR/SSIM against baselines)."""

from medsr.eval.baselines import BASELINES, imresize, make_baseline, upscale_baseline
from medsr.eval.metrics import psnr, rgb_to_y, ssim
from medsr.eval.protocol import (
    DEFAULT_SIGMA,
    EvalResult,
    ProtocolConfig,
    Sample,
    as_sr_function,
    degrade,
    evaluate,
    evaluate_image,
    prepare_gt,
)
from medsr.eval.report import markdown_table, save_figure, summarize, write_csv, write_reports

__all__ = [
    "BASELINES",
    "DEFAULT_SIGMA",
    "EvalResult",
    "ProtocolConfig",
    "Sample",
    "as_sr_function",
    "degrade",
    "evaluate",
    "evaluate_image",
    "imresize",
    "make_baseline",
    "markdown_table",
    "prepare_gt",
    "psnr",
    "rgb_to_y",
    "save_figure",
    "ssim",
    "summarize",
    "upscale_baseline",
    "write_csv",
    "write_reports",
]
