"""Fault injection ("chaos") for the sandbox's SMTP stages, with a seeded RNG.

One rule per stage. Thread-safe: a test running the sandbox in a background
thread may change the rules while sessions run.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

from .settings import STAGES, FaultRule, FaultSettings, Stage, check_late

__all__ = ["Faults", "FiredFault"]


@dataclass(frozen=True, slots=True)
class FiredFault:
    """What a stage has to do this time."""

    stage: Stage
    reply: str | None
    drop: bool
    delay: float
    late: bool = False


class Faults:
    """The current fault rules.

    ``set(stage, reply=..., drop=..., delay=..., late=..., probability=..., times=...)``
    installs or replaces the rule of a stage (see :class:`~.settings.FaultRule`);
    ``clear()`` removes rules; ``fired`` counts how often each stage's rule fired.
    """

    def __init__(self, settings: FaultSettings | None = None) -> None:
        settings = settings or FaultSettings()
        self._lock = threading.Lock()
        self._rng = random.Random(settings.seed)
        self._rules: dict[Stage, FaultRule] = dict(settings.rules())
        self._left: dict[Stage, int | None] = {s: r.times for s, r in self._rules.items()}
        self.fired: dict[Stage, int] = dict.fromkeys(STAGES, 0)

    def set(
        self,
        stage: Stage,
        *,
        reply: str | None = None,
        drop: bool = False,
        delay: float = 0.0,
        late: bool = False,
        probability: float = 1.0,
        times: int | None = None,
    ) -> FaultRule:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
        rule = FaultRule(
            reply=reply, drop=drop, delay=delay, late=late, probability=probability, times=times
        )
        check_late(stage, rule)
        with self._lock:
            self._rules[stage] = rule
            self._left[stage] = times
        return rule

    def clear(self, stage: Stage | None = None) -> None:
        with self._lock:
            if stage is None:
                self._rules.clear()
                self._left.clear()
            else:
                self._rules.pop(stage, None)
                self._left.pop(stage, None)

    def seed(self, value: int) -> None:
        with self._lock:
            self._rng.seed(value)

    def rules(self) -> dict[Stage, FaultRule]:
        with self._lock:
            return dict(self._rules)

    def pick(self, stage: Stage) -> FiredFault | None:
        """Draw for ``stage``: the fault to apply now, or ``None``."""
        with self._lock:
            rule = self._rules.get(stage)
            if rule is None:
                return None
            if rule.probability < 1.0 and self._rng.random() >= rule.probability:
                return None
            left = self._left.get(stage)
            if left is not None:
                if left <= 1:
                    del self._rules[stage]
                    self._left.pop(stage, None)
                else:
                    self._left[stage] = left - 1
            self.fired[stage] += 1
            return FiredFault(
                stage=stage, reply=rule.reply, drop=rule.drop, delay=rule.delay, late=rule.late
            )
