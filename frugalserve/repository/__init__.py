"""The model repository on disk: <repo>/<model>/config.yaml and <repo>/<model>/<version>/model.*"""

from .config import BatchingConfig, ConfigError, DeviceConfig, ModelConfig
from .repository import LoadedModel, LoadedVersion, ModelRepository, RepositoryError

__all__ = [
    "BatchingConfig",
    "ConfigError",
    "DeviceConfig",
    "LoadedModel",
    "LoadedVersion",
    "ModelConfig",
    "ModelRepository",
    "RepositoryError",
]
