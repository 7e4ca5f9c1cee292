"""The HTTP ceiling: a bare ASGI app on uvicorn (uvloop, httptools) that reads the JSON body,
parses it with orjson and returns a constant V2 answer. No model, no validation, no routing
beyond GET (health: 200) versus anything else (the constant answer)."""

from __future__ import annotations

import argparse
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import uvicorn

ANSWER = orjson.dumps({
    "model_name": "model",
    "outputs": [
        {"name": "label", "shape": [1], "datatype": "INT64", "data": [0]},
        {"name": "probabilities", "shape": [1, 10], "datatype": "FP32", "data": [0.1] * 10},
    ],
})
_HEADERS = [(b"content-type", b"application/json"),
            (b"content-length", str(len(ANSWER)).encode())]
_EMPTY = [(b"content-length", b"0")]


async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict]],
              send: Callable[[dict], Awaitable[None]]) -> None:
    if scope["type"] != "http":
        return
    if scope["method"] == "GET":
        await send({"type": "http.response.start", "status": 200, "headers": _EMPTY})
        await send({"type": "http.response.body", "body": b""})
        return
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    orjson.loads(body)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": ANSWER})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools",
                lifespan="off", access_log=False, log_level="warning")


if __name__ == "__main__":
    main()
