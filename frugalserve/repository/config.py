"""config.yaml of one model: what it takes and returns, how it batches, what it runs on.

```yaml
runtime: onnx                # optional: inferred from the artifact file
inputs:                      # optional: taken from the artifact when absent
  - {name: input, datatype: FP32, shape: [-1, 64]}
outputs:
  - {name: probabilities, datatype: FP32, shape: [-1, 10]}
batching: {max_batch_size: 32, max_queue_delay_ms: 2, max_queue_size: 1024, instances: 1}
device: {type: aws-c7i.large, share: 0.5, pricing: on_demand}
parameters: {threads: 1}     # runtime options
```
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..runtimes import RUNTIMES
from ..tensors import TensorSpec


class ConfigError(ValueError):
    """A config.yaml is wrong; the message starts with the file."""


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 32
    max_queue_delay_ms: float = 2.0
    max_queue_size: int = 1024
    instances: int = 1


@dataclass(frozen=True)
class DeviceConfig:
    type: str = "aws-c7i.large"
    share: float = 0.5
    pricing: str = "on_demand"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    runtime: str | None = None
    inputs: tuple[TensorSpec, ...] | None = None
    outputs: tuple[TensorSpec, ...] | None = None
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path, name: str) -> ModelConfig:
        raw = read_yaml(path) if path.exists() else {}
        try:
            return cls.parse(raw or {}, name)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from exc

    @classmethod
    def parse(cls, raw: Any, name: str) -> ModelConfig:
        if not isinstance(raw, dict):
            raise ValueError("the top level must be a mapping")
        _reject_unknown(raw, {"name", "runtime", "inputs", "outputs", "batching", "device",
                              "parameters"}, "config")
        batching = _section(raw, "batching", BatchingConfig)
        if batching.max_batch_size < 1 or batching.max_queue_size < 1 or batching.instances < 1:
            raise ValueError("batching: max_batch_size, max_queue_size and instances must be >= 1")
        if batching.max_queue_delay_ms < 0:
            raise ValueError("batching: max_queue_delay_ms must be >= 0")
        device = _section(raw, "device", DeviceConfig)
        if not 0 < device.share <= 1:
            raise ValueError(f"device: share must be in (0, 1], got {device.share}")
        parameters = raw.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValueError("parameters must be a mapping")
        if "name" in raw and str(raw["name"]) != name:
            raise ValueError(f"name '{raw['name']}' does not match the model folder '{name}' "
                             "(clients use the folder name; drop the key or make them agree)")
        runtime = raw.get("runtime")
        if runtime is not None and runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; known: {', '.join(sorted(RUNTIMES))}")
        return cls(
            name=name,
            runtime=runtime,
            inputs=_tensors(raw, "inputs"),
            outputs=_tensors(raw, "outputs"),
            batching=batching,
            device=device,
            parameters=parameters,
        )


def read_yaml(path: Path) -> Any:
    """A repository YAML file's content; ConfigError names the file when it cannot be read."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc


def _reject_unknown(raw: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted(known))}")


def _section(raw: dict, key: str, kind: type) -> Any:
    section = raw.get(key) or {}
    if not isinstance(section, dict):
        raise ValueError(f"{key} must be a mapping")
    _reject_unknown(section, set(kind.__dataclass_fields__), key)
    defaults = kind()
    values = {}
    for name, value in section.items():
        expected = type(getattr(defaults, name))
        try:
            values[name] = expected(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}.{name}: {value!r} is not a {expected.__name__}") from None
    return kind(**values)


def _tensors(raw: dict, key: str) -> tuple[TensorSpec, ...] | None:
    items = raw.get(key)
    if items is None:
        return None
    if not isinstance(items, list) or not items:
        raise ValueError(f"{key} must be a non-empty list")
    specs = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or not {"name", "datatype", "shape"} <= set(item):
            raise ValueError(f"{key}[{i}] needs name, datatype and shape")
        _reject_unknown(item, {"name", "datatype", "shape", "allow_nan"}, f"{key}[{i}]")
        shape = item["shape"]
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{key}[{i}].shape must be a list of integers")
        specs.append(TensorSpec(str(item["name"]), str(item["datatype"]).upper(), tuple(shape),
                                bool(item.get("allow_nan", False))))
    return tuple(specs)
