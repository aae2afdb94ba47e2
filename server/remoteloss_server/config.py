"""``ServerConfig``: every server setting, its default and its validation, in one place."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["LOG_LEVELS", "ServerConfig"]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")
_MAX_MESSAGE_BYTES = 2**31 - 1  # gRPC keeps message limits in a signed 32-bit int


@dataclass(frozen=True)
class ServerConfig:
    """Server settings. Each field is also a flag (``--torch-threads``) and an environment
    variable (``REMOTELOSS_TORCH_THREADS``); see ``cli``."""

    host: str = "[::]"
    port: int = 50051  # 0 picks a free port
    device: str = "auto"  # "auto" (cuda:0 when CUDA is available, else cpu), "cpu", "cuda", "cuda:N"
    torch_threads: int = 1  # torch.set_num_threads: intra-op threads of each CPU computation
    compute_threads: int = 1  # computations run at once, each on its own worker thread
    max_message_bytes: int = 512 * 1024 * 1024  # largest request or response gRPC accepts
    log_level: str = "INFO"
    shutdown_grace_s: float = 10.0  # how long in-flight RPCs may finish after SIGTERM

    def validate(self) -> None:
        """Raise ValueError, with a one-line message naming the setting, if any is invalid."""
        if not self.host:
            raise ValueError("host must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        if self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.compute_threads < 1:
            raise ValueError(f"compute_threads must be >= 1, got {self.compute_threads}")
        if not 1 <= self.max_message_bytes <= _MAX_MESSAGE_BYTES:
            raise ValueError(f"max_message_bytes must be in [1, {_MAX_MESSAGE_BYTES}], got {self.max_message_bytes}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if not (math.isfinite(self.shutdown_grace_s) and self.shutdown_grace_s >= 0):
            raise ValueError(f"shutdown_grace_s must be a finite number >= 0, got {self.shutdown_grace_s}")
