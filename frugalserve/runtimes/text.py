"""Text classifiers on onnxruntime: a HF `tokenizers` tokenizer, then an ONNX model over tokens.

The version (or variant) folder holds `model.onnx`, whose inputs are token tensors (`input_ids`,
and optionally `attention_mask`, `token_type_ids`), and `tokenizer.json` (the Hugging Face
tokenizers format). Clients send one BYTES input `text` [-1, 1]; the outputs are the ONNX
model's own.
"""

from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from ..tensors import TensorSpec
from .base import ModelLoadError
from .onnx import OnnxRuntime, texts

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MAX_TOKENS = 64
CHUNK_ROWS = 8


def load_tokenizer(path: Path, max_tokens: int) -> tuple[Tokenizer, int]:
    """The tokenizer, truncating to `max_tokens` and not padding, and its padding id."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not path.exists():
        raise ModelLoadError(f"{path}: missing (the text runtime needs a tokenizer.json)")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises its own Exception for any bad file
        raise ModelLoadError(f"{path}: not a loadable tokenizers file: {exc}") from exc
    # files may pad every text to a fixed length (MiniLM's: 128); rows are padded per batch here
    pad_id = int((tokenizer.padding or {}).get("pad_id", 0))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_tokens)
    return tokenizer, pad_id


class TextRuntime(OnnxRuntime):
    """Options: `threads` and `device` as the onnx runtime; `max_tokens` (default 64): longer
    texts are truncated; `chunk_rows` (default 8; 0: never split): a batch's rows are sorted by
    length and run this many at a time. Every row of a run is padded to the run's longest, and
    attention grows with the square of that: with one thread, random batches of Rotten Tomatoes
    snippets took 0.64x the time of one run in sorted runs of 8 on MiniLM-L3 at batch 32 (0.45x
    at batch 64; MiniLM-L6 at 32: 0.62x)."""

    name = "text"
    filename = "model.onnx"
    tokenizer_file = "tokenizer.json"

    @classmethod
    def detect(cls, folder: Path) -> bool:
        return super().detect(folder) and (folder / cls.tokenizer_file).exists()

    def __init__(self, path: Path, options: dict[str, Any]):
        max_tokens = int(options.get("max_tokens", MAX_TOKENS))
        self.chunk_rows = int(options.get("chunk_rows", CHUNK_ROWS))
        if self.chunk_rows < 0:
            raise ValueError(f"chunk_rows must be >= 0, got {self.chunk_rows}")
        self.tokenizer, self.pad_id = load_tokenizer(path.parent / self.tokenizer_file,
                                                     max_tokens)
        super().__init__(path, options)
        self._feeds = [i.name for i in self.session.get_inputs()]
        if "input_ids" not in self._feeds or not set(self._feeds) <= set(TOKEN_INPUTS):
            raise ModelLoadError(f"{path}: inputs {self._feeds} are not token tensors "
                                 f"(input_ids, and optionally {', '.join(TOKEN_INPUTS[1:])})")

    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        return [TensorSpec("text", "BYTES", (-1, 1))], super().signature()[1]

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        encodings = self._encode(inputs["text"])
        if not self.chunk_rows or len(encodings) <= self.chunk_rows:
            return super().predict(self._tensors(encodings))
        order = np.argsort([len(e) for e in encodings], kind="stable")
        out: dict[str, np.ndarray] = {}
        for start in range(0, len(order), self.chunk_rows):
            rows = order[start:start + self.chunk_rows]
            part = super().predict(self._tensors([encodings[i] for i in rows]))
            for name, values in part.items():
                if name not in out:
                    out[name] = np.empty((len(order), *values.shape[1:]), values.dtype)
                out[name][rows] = values
        return out

    def tokens(self, text: np.ndarray) -> dict[str, np.ndarray]:
        """The model's token tensors for a column of texts, padded to the longest row."""
        return self._tensors(self._encode(text))

    def _encode(self, text: np.ndarray) -> list[Any]:
        # one text at a time: `encode_batch` would spread over every core (rayon), more than
        # the `threads` this instance was given, and is no faster for short snippets
        return [self.tokenizer.encode(row) for row in texts(text)]

    def _tensors(self, encodings: list[Any]) -> dict[str, np.ndarray]:
        # every row's tokens land at once through a mask of the real positions (a row at a
        # time took twice as long), and only the tensors the model takes are built
        lengths = np.fromiter(map(len, encodings), np.int64, len(encodings))
        real = np.arange(max(int(lengths.max(initial=0)), 1)) < lengths[:, None]
        tensors = {}
        for name in self._feeds:
            if name == "input_ids":
                tensors[name] = _scatter(encodings, "ids", real, self.pad_id)
            elif name == "attention_mask":
                tensors[name] = real.astype(np.int64)
            else:
                tensors[name] = _scatter(encodings, "type_ids", real, 0)
        return tensors


def _scatter(encodings: list[Any], field: str, real: np.ndarray, fill: int) -> np.ndarray:
    """One token field of every row, padded with `fill` past each row's end."""
    values = np.full(real.shape, fill, np.int64)
    values[real] = np.fromiter(chain.from_iterable(getattr(e, field) for e in encodings),
                               np.int64, int(real.sum()))
    return values
