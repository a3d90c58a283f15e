"""The sweep's search space, declared in YAML over dotted config keys:

    sweep:
      space:
        teacher.lr: {loguniform: [3.0e-4, 1.0e-2]}
        teacher.batch_size: {choice: [32, 64]}
        teacher.warmup_fraction: {uniform: [0.0, 0.3]}
        data.augment.affine.degrees: {int: [0, 30]}

Each entry is one distribution: `uniform` / `loguniform` (floats in [low, high]), `int`
(integers in [low, high], both included) or `choice` (a list of values). Checked in two steps,
both before any trial starts: the shape of each entry when the config loads (empty or inverted
ranges, a non-positive loguniform bound), and then that every key names a config value and
that every bound is a valid value for it (`config.check_space`), and before Ray starts that
the key changes the recipe a trial trains (`sweep.check_swept_keys`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

KINDS = ("uniform", "loguniform", "int", "choice")
_ATTR = {"uniform": "uniform", "loguniform": "loguniform", "int": "integer", "choice": "choice"}

class Dist(BaseModel):
    """One search dimension: exactly one of uniform, loguniform, int, choice."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    integer: tuple[int, int] | None = Field(None, alias="int")  # `int` in YAML
    choice: list[Any] | None = None

    def spec(self, kind: str):
        return getattr(self, _ATTR[kind])

    @model_validator(mode="after")
    def _one_valid_kind(self) -> "Dist":
        given = [k for k in KINDS if self.spec(k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})")
        kind = given[0]
        if kind == "choice":
            if not self.choice:
                raise ValueError("choice: the list of values is empty")
            return self
        low, high = self.spec(kind)
        if low == high:
            raise ValueError(f"{kind}: the range [{low}, {high}] is empty (low must be below high)")
        if low > high:
            raise ValueError(f"{kind}: the range [{low}, {high}] is inverted (low must be below high)")
        if kind == "loguniform" and low <= 0:
            raise ValueError(f"loguniform: bounds must be positive (got low={low})")
        return self

    @model_serializer(mode="plain")
    def _as_yaml(self) -> dict:
        # The spelling it was written in ({loguniform: [a, b]}), so best.yaml reads back as is.
        return {self.kind: list(self.spec(self.kind))}

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if self.spec(k) is not None)

    def values_to_check(self) -> list:
        """Values that must each be valid for the key: every choice, or both bounds and, for
        the float kinds, a fractional point inside (an integer or a Literal key refuses it:
        such a key needs `int` or `choice`)."""
        values = list(self.spec(self.kind))
        if self.kind in ("uniform", "loguniform"):
            low, high = values
            values.append(low + (high - low) * 0.371)
        return values

    def to_tune(self):
        """The Ray Tune domain (OptunaSearch converts it to Optuna's distributions)."""
        from ray import tune

        if self.kind == "uniform":
            return tune.uniform(*self.uniform)
        if self.kind == "loguniform":
            return tune.loguniform(*self.loguniform)
        if self.kind == "int":
            return tune.randint(self.integer[0], self.integer[1] + 1)  # randint's upper bound is exclusive
        return tune.choice(list(self.choice))

    def describe(self) -> str:
        return f"{self.kind} {list(self.spec(self.kind))}"
