"""Reads models from disk and checks them; knows nothing of serving."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..runtimes import ModelLoadError, Runtime, runtime_for
from ..tensors import TensorSpec
from .config import ConfigError, ModelConfig

CONFIG_FILE = "config.yaml"


class RepositoryError(Exception):
    """A model in the repository cannot be loaded; the message names the file and the problem."""


@dataclass
class LoadedVersion:
    version: str
    runtime: Runtime
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


@dataclass
class LoadedModel:
    name: str
    config: ModelConfig
    versions: dict[str, LoadedVersion]

    @property
    def latest(self) -> str:
        return max(self.versions, key=int)

    def close(self) -> None:
        for version in self.versions.values():
            version.runtime.close()


class ModelRepository:
    def __init__(self, root: Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise RepositoryError(f"{self.root}: model repository is not a directory")

    def names(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def fingerprint(self, name: str) -> tuple:
        """Changes whenever a file of the model changes: size and mtime of every file."""
        folder = self.root / name
        stamps = []
        for dirpath, _dirs, files in os.walk(folder):
            for f in files:
                try:
                    st = os.stat(os.path.join(dirpath, f))
                except FileNotFoundError:
                    continue
                stamps.append((dirpath, f, st.st_size, st.st_mtime_ns))
        return tuple(sorted(stamps))

    def load(self, name: str) -> LoadedModel:
        # a model is a folder directly under the root: '', '..', 'a/b' or a hidden name is not
        if not name or name.startswith(".") or any(c in name for c in "/\\\0"):
            raise RepositoryError(f"{name!r} is not a model name in {self.root}")
        folder = self.root / name
        try:
            is_dir = folder.is_dir()
        except OSError as exc:  # e.g. a name too long for the file system
            raise RepositoryError(f"{folder}: {exc.strerror}") from None
        if not is_dir:
            raise RepositoryError(f"{folder}: no such model folder")
        try:
            config = ModelConfig.load(folder / CONFIG_FILE, name)
        except ConfigError as exc:
            raise RepositoryError(str(exc)) from exc
        version_dirs = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                              key=lambda p: int(p.name))
        if not version_dirs:
            raise RepositoryError(f"{folder}: no version folders (expected {folder}/1/...)")
        versions: dict[str, LoadedVersion] = {}
        try:
            for vdir in version_dirs:
                versions[vdir.name] = _load_version(vdir, config)
        except RepositoryError:
            for loaded in versions.values():
                loaded.runtime.close()
            raise
        return LoadedModel(config.name, config, versions)


def _load_version(vdir: Path, config: ModelConfig) -> LoadedVersion:
    try:
        kind = runtime_for(vdir, config.runtime)
        artifact = vdir / kind.filename
        if not artifact.exists():
            raise ModelLoadError(f"{artifact}: missing ({kind.name} runtime)")
        runtime = kind(artifact, dict(config.parameters))
    except ModelLoadError as exc:
        raise RepositoryError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a bad runtime option in config.yaml
        raise RepositoryError(f"{vdir.parent / CONFIG_FILE}: parameters "
                              f"{dict(config.parameters)} do not work for "
                              f"{vdir / kind.filename}: {exc}") from exc
    found_in, found_out = runtime.signature()
    where = vdir.parent / CONFIG_FILE
    try:
        inputs = _reconcile(config.inputs, found_in, "input")
        outputs = _reconcile(config.outputs, found_out, "output")
    except ValueError as exc:
        runtime.close()
        raise RepositoryError(f"{where}: version {vdir.name}: {exc}") from exc
    return LoadedVersion(vdir.name, runtime, inputs, outputs)


def _reconcile(declared: tuple[TensorSpec, ...] | None, found: list[TensorSpec],
               kind: str) -> tuple[TensorSpec, ...]:
    """Declared tensors must exist in the artifact with the same type and a compatible shape;
    with nothing declared, the artifact's own signature is used (Triton's auto-complete)."""
    by_name = {t.name: t for t in found}
    specs = declared if declared is not None else tuple(found)
    for spec in specs:
        actual = by_name.get(spec.name)
        if actual is None:
            raise ValueError(f"{kind} '{spec.name}' is not in the model; it has {sorted(by_name)}")
        if actual.datatype != spec.datatype:
            raise ValueError(f"{kind} '{spec.name}' is {actual.datatype} in the model, "
                             f"{spec.datatype} in the config")
        if len(actual.shape) != len(spec.shape) or any(
            a != d and -1 not in (a, d) for a, d in zip(actual.shape, spec.shape, strict=True)
        ):
            raise ValueError(f"{kind} '{spec.name}' has shape {list(actual.shape)} in the model, "
                             f"{list(spec.shape)} in the config")
        if spec.shape[0] != -1 or actual.shape[0] != -1:
            raise ValueError(f"{kind} '{spec.name}' needs a variable batch axis (-1) first")
    return tuple(specs)
