"""plan.yaml of one model: which variants serve it, in what order, for which tier.

```yaml
version: "1"                  # the model version the plan is for; other versions serve plainly
default_tier: standard        # for requests whose tier the plan does not name
tiers:
  premium:  {stages: [{variant: reference}]}
  standard:                   # a cascade: rows whose confidence (the max of the row of
    stages:                   # `confidence_output`) is below a stage's threshold go on
      - {variant: int8-dynamic, threshold: 0.87}
      - {variant: reference}
  economy:  {stages: [{variant: student}]}
confidence_output: probabilities
batching: {max_batch_size: 64, max_queue_delay_ms: 5}     # overrides config.yaml's
budget_downgrade: {spent_fraction: 0.8, tier: economy}    # a tenant near its budget
estimate: {}                  # free-form: what `frugalserve optimize` expected
```

"reference" is the version's own artifact; any other variant is the folder
`<version>/variants/<variant>/`, laid out like a version folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import BatchingConfig, ConfigError, _reject_unknown, _section, read_yaml

PLAN_FILE = "plan.yaml"
REFERENCE = "reference"
VARIANTS_DIR = "variants"


@dataclass(frozen=True)
class Stage:
    variant: str
    threshold: float | None = None  # None: the last stage, which answers every row


@dataclass(frozen=True)
class BudgetDowngrade:
    spent_fraction: float
    tier: str


@dataclass(frozen=True)
class Plan:
    version: str | None
    tiers: dict[str, tuple[Stage, ...]]
    default_tier: str
    confidence_output: str = "probabilities"
    batching: BatchingConfig | None = None
    budget_downgrade: BudgetDowngrade | None = None
    estimate: dict[str, Any] = field(default_factory=dict)

    @property
    def variants(self) -> list[str]:
        """Every variant some tier uses, in first-use order."""
        seen: dict[str, None] = {}
        for stages in self.tiers.values():
            for stage in stages:
                seen.setdefault(stage.variant)
        return list(seen)

    @classmethod
    def parse(cls, raw: Any) -> Plan:
        if not isinstance(raw, dict):
            raise ValueError("the top level must be a mapping")
        _reject_unknown(raw, {"version", "default_tier", "tiers", "confidence_output",
                              "batching", "budget_downgrade", "estimate"}, "plan")
        tiers_raw = raw.get("tiers")
        if not isinstance(tiers_raw, dict) or not tiers_raw:
            raise ValueError("tiers must be a non-empty mapping of tier name to {stages: [...]}")
        tiers = {str(name): _stages(body, str(name)) for name, body in tiers_raw.items()}
        _check_order(tiers)
        default = str(raw.get("default_tier", next(iter(tiers))))
        if default not in tiers:
            raise ValueError(f"default_tier '{default}' is not one of the tiers "
                             f"({', '.join(tiers)})")
        batching = None
        if raw.get("batching") is not None:
            batching = _section(raw, "batching", BatchingConfig)
            if batching.max_batch_size < 1 or batching.max_queue_delay_ms < 0:
                raise ValueError("batching: max_batch_size must be >= 1 and "
                                 "max_queue_delay_ms >= 0")
        downgrade = None
        if raw.get("budget_downgrade") is not None:
            d = raw["budget_downgrade"]
            if not isinstance(d, dict) or set(d) != {"spent_fraction", "tier"}:
                raise ValueError("budget_downgrade needs exactly spent_fraction and tier")
            downgrade = BudgetDowngrade(float(d["spent_fraction"]), str(d["tier"]))
            if not 0 < downgrade.spent_fraction <= 1:
                raise ValueError("budget_downgrade.spent_fraction must be in (0, 1]")
            if downgrade.tier not in tiers:
                raise ValueError(f"budget_downgrade.tier '{downgrade.tier}' is not one of the "
                                 f"tiers ({', '.join(tiers)})")
        estimate = raw.get("estimate") or {}
        if not isinstance(estimate, dict):
            raise ValueError("estimate must be a mapping")
        version = raw.get("version")
        return cls(version=None if version is None else str(version), tiers=tiers,
                   default_tier=default,
                   confidence_output=str(raw.get("confidence_output", "probabilities")),
                   batching=batching, budget_downgrade=downgrade, estimate=estimate)


def _stages(body: Any, tier: str) -> tuple[Stage, ...]:
    where = f"tiers.{tier}"
    if not isinstance(body, dict) or set(body) != {"stages"}:
        raise ValueError(f"{where} must be a mapping with one key, stages")
    raw = body["stages"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}.stages must be a non-empty list")
    stages = []
    for i, item in enumerate(raw):
        at = f"{where}.stages[{i}]"
        if not isinstance(item, dict) or "variant" not in item:
            raise ValueError(f"{at} needs a variant")
        _reject_unknown(item, {"variant", "threshold"}, at)
        variant = str(item["variant"])
        if not variant or variant.startswith(".") or any(c in variant for c in "/\\\0"):
            raise ValueError(f"{at}: {variant!r} is not a variant name")
        last = i == len(raw) - 1
        threshold = item.get("threshold")
        if last and threshold is not None:
            raise ValueError(f"{at}: the last stage answers every row; it takes no threshold")
        if not last:
            if threshold is None:
                raise ValueError(f"{at}: every stage but the last needs a threshold")
            try:
                threshold = float(threshold)
            except (TypeError, ValueError):
                raise ValueError(f"{at}.threshold: {threshold!r} is not a number") from None
            if not 0 <= threshold <= 1:
                raise ValueError(f"{at}.threshold must be in [0, 1], got {threshold}")
        if any(s.variant == variant for s in stages):
            raise ValueError(f"{at}: variant '{variant}' appears twice in the cascade")
        stages.append(Stage(variant, threshold))
    return tuple(stages)


def _check_order(tiers: dict[str, tuple[Stage, ...]]) -> None:
    """Two variants must come in the same order in every tier that uses both: the server drains
    earlier stages first at unload, so that their escalations still find the later ones open."""
    before: dict[tuple[str, str], str] = {}
    for tier, stages in tiers.items():
        names = [s.variant for s in stages]
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                if (b, a) in before:
                    raise ValueError(f"tiers.{tier} puts '{a}' before '{b}', tiers."
                                     f"{before[(b, a)]} puts '{b}' before '{a}'; cascades "
                                     "must agree on the order of their variants")
                before.setdefault((a, b), tier)


def load_plan(path: Path) -> Plan:
    """Read and validate a plan file; ConfigError names the file and the problem."""
    path = Path(path)
    raw = read_yaml(path)
    try:
        return Plan.parse(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def variant_dir(version_dir: Path, variant: str) -> Path:
    return version_dir if variant == REFERENCE else version_dir / VARIANTS_DIR / variant
