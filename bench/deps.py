"""What the benchmark installs for itself: wrk (apt), FastAPI and torch (project venv), MLServer
(its own virtualenv, bench/.venv-mlserver)."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import shutil
import subprocess
import sys

from servers import MLSERVER_VENV

MLSERVER_VERSION = "1.7.1"
# trains the compute-bound CNN; pinned: the CPU wheel (an unpinned torch pulls CUDA packages)
TORCH_VERSION = "2.13.0"
# httptools: so MLServer's uvicorn parses HTTP with the same C parser as the other servers
MLSERVER_EXTRAS = ["onnxruntime", "httptools"]


def _quiet(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True)


def ensure_wrk() -> None:
    if shutil.which("wrk") is None:
        _quiet(["apt-get", "update", "-qq"])
        if _quiet(["apt-get", "install", "-y", "-qq", "wrk"]).returncode != 0:
            raise RuntimeError("wrk is missing and apt-get could not install it")


def ensure_fastapi() -> None:
    if importlib.util.find_spec("fastapi") is None:
        done = _quiet([sys.executable, "-m", "pip", "install", "-q", "fastapi"])
        if done.returncode != 0:
            raise RuntimeError(f"pip install fastapi failed:\n{done.stderr}")


def ensure_torch() -> str | None:
    """Install torch==TORCH_VERSION into the project venv if it is missing, showing pip's own
    output (its progress bars); returns a note when another version is installed."""
    if importlib.util.find_spec("torch") is None:
        print(f"installing torch=={TORCH_VERSION} into {sys.prefix} (trains the CNN)", flush=True)
        argv = [sys.executable, "-m", "pip", "install", "--progress-bar", "on",
                f"torch=={TORCH_VERSION}"]
        if subprocess.run(argv).returncode != 0:
            raise RuntimeError(f"pip install torch=={TORCH_VERSION} failed (output above)")
        importlib.invalidate_caches()
    version = importlib.metadata.version("torch")
    if version.split("+")[0] != TORCH_VERSION:
        return f"torch {version} is installed, not {TORCH_VERSION}; the CNN was trained with it."
    return None


def _mlserver_version() -> str | None:
    python = MLSERVER_VENV / "bin" / "python"
    if not python.exists():
        return None
    probe = "import mlserver, onnxruntime, httptools; print(mlserver.__version__)"
    done = _quiet([str(python), "-c", probe])
    return done.stdout.strip() if done.returncode == 0 else None


def ensure_mlserver() -> tuple[str, str | None]:
    """MLServer's version, and a note when it is not the pinned one."""
    version = _mlserver_version()
    if version is None:
        if not (MLSERVER_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        pip = [str(MLSERVER_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        if _quiet([*pip, f"mlserver=={MLSERVER_VERSION}", *MLSERVER_EXTRAS]).returncode != 0:
            done = _quiet([*pip, "--upgrade", "mlserver", *MLSERVER_EXTRAS])
            if done.returncode != 0:
                raise RuntimeError(f"pip install mlserver failed:\n{done.stderr}")
        version = _mlserver_version()
    if version is None:
        raise RuntimeError(f"MLServer in {MLSERVER_VENV} does not import")
    note = None
    if version != MLSERVER_VERSION:
        note = f"MLServer {MLSERVER_VERSION} was not installable; measured {version} instead."
    return version, note
