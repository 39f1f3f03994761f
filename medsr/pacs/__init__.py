"""PACS integration: ``medsr-node`` (DICOM Storage SCP -> durable spool -> Upscaler -> C-STORE / STOW-RS).

>>> from medsr.pacs import Node, load_config
>>> with Node(load_config("node.toml"), upscalers=[upscaler]) as node:
...     ...  # serving until the block ends

See docs/pacs.md. pynetdicom, prometheus-client and dicomweb-client are imported when a node starts.
"""

from __future__ import annotations

from medsr.pacs.config import ConfigError, NodeConfig, load_config, parse_config
from medsr.pacs.node import Node
from medsr.pacs.protocol import DicomUpscaler
from medsr.pacs.queue import SpoolError, WorkQueue

__all__ = ["ConfigError", "DicomUpscaler", "Node", "NodeConfig", "SpoolError", "WorkQueue", "load_config",
           "parse_config"]
