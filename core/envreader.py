"""Reading settings from an environment mapping, collecting every problem before failing.

Shared by every process's settings (reconciler, functions, exporter) so that all of them accept
the same spellings and report a bad value the same way: one line per variable, naming it.
"""

from __future__ import annotations

from collections.abc import Mapping

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


class EnvReader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.errors: list[str] = []

    def error(self, name: str, message: str) -> None:
        self.errors.append(f"{name}: {message}")

    def get(self, name: str, default: str = "") -> str:
        """The stripped value, or ``default`` when unset or blank."""
        return self.env.get(name, "").strip() or default

    def flag(self, name: str, default: bool = False) -> bool:
        value = self.get(name).lower()
        if not value:
            return default
        if value in _TRUE:
            return True
        if value not in _FALSE:
            self.error(name, f"must be true or false (got {self.env[name]!r})")
        return False

    def whole(self, name: str, default: int, low: int, high: int | None = None) -> int:
        value = self.optional_whole(name, low, high)
        return default if value is None else value

    def optional_whole(self, name: str, low: int, high: int | None = None) -> int | None:
        value = self.get(name)
        if not value:
            return None
        if not value.isdigit() or int(value) < low or (high is not None and int(value) > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            self.error(name, f"must be a whole number {bound} (got {value!r})")
            return None
        return int(value)

    def raise_if_errors(self, error_type: type[ValueError]) -> None:
        if self.errors:
            raise error_type("invalid settings:\n  " + "\n  ".join(self.errors))
