"""Fine-tuning Real-ESRGAN on medical images: degradations, data, networks, losses, trainer, configs.

Heavy pieces are imported from their modules (``medsr.train.trainer`` etc.), not here.
"""

from __future__ import annotations

from medsr.train.config import ConfigError, load_config, set_value, shipped_configs, validate

__all__ = ["ConfigError", "load_config", "set_value", "shipped_configs", "validate"]
