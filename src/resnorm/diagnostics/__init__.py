"""Diagnostics for any PyTorch model: gradient flow and signal propagation, with verdicts."""

from .analyze import analyze, read_records
from .callbacks import hf_callback, lightning_callback
from .diagnose import BlockStat, Diagnosis, default_loss, diagnose
from .landscape import LayerShift, LossLandscape, internal_covariate_shift, loss_landscape
from .monitor import Monitor
from .probes import find_blocks, unwrap
from .stats import ActivationSummary, channel_stats, summarize_activation
from .verdict import LayerGrad, Signal, Thresholds, Verdict

__all__ = [
    "ActivationSummary",
    "Signal",
    "analyze",
    "read_records",
    "BlockStat",
    "Diagnosis",
    "LayerGrad",
    "LayerShift",
    "LossLandscape",
    "Monitor",
    "Thresholds",
    "Verdict",
    "channel_stats",
    "default_loss",
    "diagnose",
    "find_blocks",
    "hf_callback",
    "internal_covariate_shift",
    "lightning_callback",
    "loss_landscape",
    "summarize_activation",
    "unwrap",
]
