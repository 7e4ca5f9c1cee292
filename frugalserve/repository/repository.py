"""Reads models from disk and checks them; knows nothing of serving."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..runtimes import ModelLoadError, Runtime, runtime_for
from ..tensors import TensorSpec
from .config import ConfigError, ModelConfig
from .plan import PLAN_FILE, REFERENCE, Plan, load_plan, variant_dir

CONFIG_FILE = "config.yaml"


class RepositoryError(Exception):
    """A model in the repository cannot be loaded; the message names the file and the problem."""


@dataclass
class LoadedVersion:
    version: str
    runtime: Runtime  # the reference variant
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    plan: Plan | None = None
    variants: dict[str, Runtime] = field(default_factory=dict)  # the plan's, but reference

    def runtime_of(self, variant: str) -> Runtime:
        return self.runtime if variant == REFERENCE else self.variants[variant]

    def close(self) -> None:
        self.runtime.close()
        for runtime in self.variants.values():
            runtime.close()


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
            version.close()


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
        version_dirs = version_folders(folder)
        plan = None
        if (folder / PLAN_FILE).exists():
            try:
                plan = load_plan(folder / PLAN_FILE)
            except ConfigError as exc:
                raise RepositoryError(str(exc)) from exc
            names = [p.name for p in version_dirs]
            if plan.version is not None and plan.version not in names:
                raise RepositoryError(f"{folder / PLAN_FILE}: version '{plan.version}' is not "
                                      f"in the repository (it has {', '.join(names)})")
        planned = (plan.version or version_dirs[-1].name) if plan else None
        versions: dict[str, LoadedVersion] = {}
        try:
            for vdir in version_dirs:
                loaded = versions[vdir.name] = _load_version(vdir, config)
                if vdir.name == planned:
                    _load_variants(loaded, plan, vdir, config)
        except RepositoryError:
            for loaded in versions.values():
                loaded.close()
            raise
        return LoadedModel(config.name, config, versions)


def version_folders(folder: Path) -> list[Path]:
    """A model folder's version folders, oldest (lowest number) first; at least one."""
    found = sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()),
                   key=lambda p: int(p.name))
    if not found:
        raise RepositoryError(f"{folder}: no version folders (expected {folder}/1/...)")
    return found


Signature = tuple[list[TensorSpec], list[TensorSpec]] | tuple[tuple[TensorSpec, ...], ...]


def signature_mismatch(expected: Signature, found: Signature) -> str | None:
    """Why `found` does not take and return the same tensors as `expected` (names, datatypes,
    shapes; -1 matches any size), or None when it does: what a variant must satisfy."""
    for kind, want, have in (("inputs", expected[0], found[0]), ("outputs", expected[1], found[1])):
        if sorted(t.name for t in want) != sorted(t.name for t in have):
            return f"{kind} {sorted(t.name for t in have)}, not {sorted(t.name for t in want)}"
        by_name = {t.name: t for t in have}
        for t in want:
            other = by_name[t.name]
            if other.datatype != t.datatype:
                return f"{t.name} is {other.datatype}, not {t.datatype}"
            if len(other.shape) != len(t.shape) or any(
                    a != b and -1 not in (a, b) for a, b in zip(other.shape, t.shape, strict=True)):
                return f"{t.name} has shape {list(other.shape)}, not {list(t.shape)}"
    return None


def _open_runtime(folder: Path, config: ModelConfig, runtime: str | None,
                  config_file: Path) -> Runtime:
    try:
        kind = runtime_for(folder, runtime)
        artifact = folder / kind.filename
        if not artifact.exists():
            raise ModelLoadError(f"{artifact}: missing ({kind.name} runtime)")
        return kind(artifact, dict(config.parameters))
    except ModelLoadError as exc:
        raise RepositoryError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - e.g. a bad runtime option in config.yaml
        raise RepositoryError(f"{config_file}: parameters "
                              f"{dict(config.parameters)} do not work for "
                              f"{folder / kind.filename}: {exc}") from exc


def _load_version(vdir: Path, config: ModelConfig) -> LoadedVersion:
    runtime = _open_runtime(vdir, config, config.runtime, vdir.parent / CONFIG_FILE)
    found_in, found_out = runtime.signature()
    try:
        inputs = _reconcile(config.inputs, found_in, "input")
        outputs = _reconcile(config.outputs, found_out, "output")
    except ValueError as exc:
        runtime.close()
        raise RepositoryError(f"{vdir.parent / CONFIG_FILE}: version {vdir.name}: {exc}") \
            from exc
    return LoadedVersion(vdir.name, runtime, inputs, outputs)


def _load_variants(loaded: LoadedVersion, plan: Plan, vdir: Path, config: ModelConfig) -> None:
    """Open every variant the plan uses; each must take and return what the reference does."""
    where = vdir.parent / PLAN_FILE
    by_name = {s.name: s for s in loaded.outputs}
    cascades = any(len(stages) > 1 for stages in plan.tiers.values())
    conf = by_name.get(plan.confidence_output)
    if cascades and (conf is None or conf.datatype not in ("FP32", "FP64", "FP16")
                     or len(conf.shape) != 2):
        raise RepositoryError(f"{where}: confidence_output '{plan.confidence_output}' must be "
                              "a floating-point output of shape [-1, classes]; the model has "
                              f"{[s.as_dict() for s in loaded.outputs]}")
    loaded.plan = plan
    for variant in plan.variants:
        if variant == REFERENCE:
            continue
        folder = variant_dir(vdir, variant)
        if not folder.is_dir():
            raise RepositoryError(f"{where}: variant '{variant}' has no folder {folder}")
        # a variant's own files say its runtime: a TF-IDF ONNX file may stand in front of a
        # tokenizer + encoder model, as long as both take and return the same tensors
        runtime = loaded.variants[variant] = _open_runtime(folder, config, None,
                                                           vdir.parent / CONFIG_FILE)
        mismatch = signature_mismatch((loaded.inputs, loaded.outputs), runtime.signature())
        if mismatch:
            raise RepositoryError(f"{folder}: variant '{variant}' does not match the "
                                  f"reference: {mismatch}")


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
