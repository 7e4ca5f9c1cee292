"""Quantized variants: int8 (dynamic, or static with calibration data) and fp16.

int8 dynamic: weights are stored as int8 once; each call quantizes its activations on the fly
(MatMulInteger / DynamicQuantizeMatMul). Needs no data; the usual first choice for MLPs.

int8 static: activations are quantized too, with scales fixed from calibration inputs (here,
validation rows). The default format is QDQ (QuantizeLinear/DequantizeLinear pairs around
fp32 ops): onnxruntime fuses those pairs into the same integer kernels the QOperator format
names explicitly (QLinearMatMul, QLinearConv), so on a CPU both run at the same speed
(measured on a 128-hidden Fashion-MNIST MLP, onnxruntime 1.32, one thread of an AMD EPYC: 0.008
and 0.030 ms per call at batch 1 and 64 in either format), and QDQ is the format ORT
recommends, keeps the graph readable and is the one other execution providers (TensorRT,
OpenVINO) accept. QOperator stays available with `fmt="qoperator"`.

fp16: on CPUs without native fp16 arithmetic onnxruntime computes most fp16 ops by converting
to fp32 and back, so the variant is half the size but usually slower; it exists for GPUs and
for memory, and its profile says what it costs here.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from . import graph

FORMATS = {"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}
# the ops worth quantizing in the models we serve; others (Softmax, ArgMax, ai.onnx.ml) stay fp32
OP_TYPES = ["MatMul", "Gemm", "Conv"]

log = logging.getLogger("frugalserve.optimize")


class RowsReader(CalibrationDataReader):
    """Calibration inputs: rows of `x` in batches, under the model's input name."""

    def __init__(self, name: str, x: np.ndarray, batch: int = 64):
        self.name, self.x, self.batch = name, np.ascontiguousarray(x, dtype=np.float32), batch
        self._it: Iterator[dict[str, np.ndarray]] = self._batches()

    def _batches(self) -> Iterator[dict[str, np.ndarray]]:
        for i in range(0, len(self.x), self.batch):
            yield {self.name: self.x[i:i + self.batch]}

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = self._batches()


def _preprocessed(src: Path, workdir: Path) -> Path:
    """ORT's recommended pre-pass (shape inference + fp32 graph optimisation) before quantizing;
    some graphs (custom domains) refuse it, and then the original is quantized as it is."""
    out = workdir / "pre.onnx"
    try:
        quant_pre_process(str(src), str(out), skip_symbolic_shape=True)
    except Exception as exc:  # noqa: BLE001 - the pre-pass is an optimisation, not a need
        log.info("quantization pre-process skipped for %s: %s", src, exc)
        return Path(src)
    return out


def quantize_int8_dynamic(src: Path, dst: Path, per_channel: bool = False) -> Path:
    """Weights int8 (signed, as x86 VNNI wants), activations quantized per call."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        quantize_dynamic(str(_preprocessed(Path(src), Path(tmp))), str(dst),
                         op_types_to_quantize=OP_TYPES, per_channel=per_channel,
                         weight_type=QuantType.QInt8)
    return Path(dst)


def quantize_int8_static(src: Path, dst: Path, calibration: np.ndarray, fmt: str = "qdq",
                         per_channel: bool = False, max_rows: int = 1024) -> Path:
    """Weights and activations int8, activation ranges from `calibration` rows (min/max).
    Activations are uint8 and weights int8 (the combination ORT's x86 kernels are fastest for)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {sorted(FORMATS)}, got {fmt!r}")
    name = graph.input_name(graph.load(Path(src)))
    with tempfile.TemporaryDirectory() as tmp:
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        quantize_static(str(_preprocessed(Path(src), Path(tmp))), str(dst),
                        RowsReader(name, calibration[:max_rows]), quant_format=FORMATS[fmt],
                        op_types_to_quantize=OP_TYPES, per_channel=per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax)
    return Path(dst)


def convert_fp16(src: Path, dst: Path) -> Path:
    """Weights and compute in fp16, inputs and outputs kept fp32 (clients send the same request);
    ops with no fp16 kernel (ai.onnx.ml ones, ArgMax's neighbours) stay fp32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(graph.load(Path(src)), keep_io_types=True,
                                     disable_shape_infer=False)
    return graph.save(model, Path(dst))
