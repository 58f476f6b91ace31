"""A small pass manager: each pass rewrites a ``GraphModule`` and reports what it changed and skipped.

A pass is a callable ``pass_fn(gm, ctx) -> PassResult``. The manager runs passes in order, lints and
recompiles the graph after each one, and keeps every result so a user (or a test) can see, per pass,
how many nodes were rewritten and why candidates were left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch.fx as fx


@dataclass
class PassResult:
    name: str
    changed: dict[str, int] = field(default_factory=dict)  # counter name -> count
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node or module name, reason)
    details: dict[str, str] = field(default_factory=dict)  # node or module name -> what the pass did with it

    def count(self, key: str, n: int = 1) -> None:
        self.changed[key] = self.changed.get(key, 0) + n

    def skip(self, what: str, reason: str) -> None:
        self.skipped.append((what, reason))

    @property
    def total(self) -> int:
        return sum(self.changed.values())

    def to_dict(self) -> dict[str, Any]:
        out = {"name": self.name, "changed": dict(self.changed),
               "skipped": [{"node": w, "reason": r} for w, r in self.skipped]}
        if self.details:
            out["details"] = dict(self.details)
        return out

    def __str__(self) -> str:
        changed = ", ".join(f"{k}={v}" for k, v in self.changed.items()) or "nothing"
        return f"{self.name}: {changed}; {len(self.skipped)} skipped"


PassFn = Callable[[fx.GraphModule, Any], PassResult]


class PassManager:
    def __init__(self, passes: list[PassFn]):
        self.passes = list(passes)

    def run(self, gm: fx.GraphModule, ctx: Any) -> list[PassResult]:
        results = []
        for p in self.passes:
            result = p(gm, ctx)
            gm.graph.lint()
            gm.recompile()
            results.append(result)
        return results
