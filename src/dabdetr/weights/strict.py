"""State-dict loading that reports every missing, unexpected or mis-shaped key."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from torch import Tensor, nn

from dabdetr.errors import BadWeightsError


@dataclass
class LoadReport:
    """What a state-dict load found. `ok` is True when every key matched in name and shape."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    loaded: int = 0

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def format(self) -> str:
        lines = [f"loaded {self.loaded} tensors"]
        for name, items in (("missing", self.missing), ("unexpected", self.unexpected)):
            if items:
                lines.append(f"{name} ({len(items)}): " + ", ".join(items))
        if self.mismatched:
            shapes = ", ".join(f"{k} file {list(a)} vs model {list(b)}" for k, a, b in self.mismatched)
            lines.append(f"mis-shaped ({len(self.mismatched)}): {shapes}")
        return "\n".join(lines)


def load_state_dict_checked(
    model: nn.Module,
    state_dict: Mapping[str, Tensor],
    strict: bool = True,
) -> LoadReport:
    """Load `state_dict` into `model`, reporting every problem at once.

    strict=True raises BadWeightsError (a ValueError) listing all missing, unexpected and
    mis-shaped keys (nothing is loaded then). strict=False loads every key that fits and
    leaves the rest at their current (initial) values; mis-shaped keys are skipped, e.g. a
    class head of another size.
    """
    own = model.state_dict()
    report = LoadReport()
    usable: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            report.mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            usable[key] = value
    report.missing = [k for k in own if k not in usable
                      and not any(k == m[0] for m in report.mismatched)]
    if strict and not report.ok:
        raise BadWeightsError("state dict does not fit the model:\n" + report.format())
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report
