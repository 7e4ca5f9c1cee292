"""Closed-loop HTTP load with wrk, pinned to its own core, and the parse of its report."""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

WRK_CORE = 1
_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}  # -> milliseconds
_LUA = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[{body}]==]
"""
# a binary body cannot sit in a Lua long string: the script reads it from a file
_LUA_BINARY = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Inference-Header-Content-Length"] = "{header_length}"
local file = assert(io.open([==[{path}]==], "rb"))
wrk.body = file:read("*a")
file:close()
"""


@dataclass(frozen=True)
class WrkResult:
    connections: int
    seconds: int
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # non-2xx/3xx responses
    socket_errors: int  # connect + read + write + timeout
    socket_error_detail: str  # wrk's own breakdown, "" when there were none
    output: str = field(default="", repr=False)  # wrk's report, as printed


def write_script(body: bytes, path: Path) -> Path:
    text = body.decode()
    if "]==]" in text:
        raise ValueError("the request body cannot be quoted as a Lua long string")
    path.write_text(_LUA.format(body=text))
    return path


def write_binary_script(body: bytes, header_length: int, path: Path) -> Path:
    """A script for a V2 binary-extension request: the body goes to `path` with suffix .bin."""
    data_path = path.with_suffix(".bin").resolve()
    if "]==]" in str(data_path):
        raise ValueError("the body's path cannot be quoted as a Lua long string")
    data_path.write_bytes(body)
    path.write_text(_LUA_BINARY.format(header_length=header_length, path=data_path))
    return path


def _number(pattern: str, text: str, default: str | None = None) -> str:
    match = re.search(pattern, text, re.MULTILINE)
    if match is None:
        if default is None:
            raise ValueError(f"wrk output has no match for {pattern!r}:\n{text}")
        return default
    return match.group(1)


def _percentile_ms(percent: int, text: str) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.MULTILINE)
    if match is None:
        raise ValueError(f"wrk output has no {percent}% latency:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(text: str, connections: int, seconds: int) -> WrkResult:
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                       text)
    return WrkResult(
        connections=connections,
        seconds=seconds,
        requests=int(_number(r"^\s+(\d+) requests in", text)),
        rps=float(_number(r"^Requests/sec:\s+([\d.]+)", text)),
        p50_ms=_percentile_ms(50, text),
        p99_ms=_percentile_ms(99, text),
        non_2xx=int(_number(r"Non-2xx or 3xx responses: (\d+)", text, default="0")),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        socket_error_detail=errors.group(0) if errors else "",
        output=text,
    )


def run(url: str, script: Path, connections: int, seconds: int) -> WrkResult:
    argv = ["taskset", "-c", str(WRK_CORE), "wrk", "-t1", f"-c{connections}", f"-d{seconds}s",
            "--latency", "-s", str(script), url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return parse(done.stdout, connections, seconds)
