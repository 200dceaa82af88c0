"""One small error hierarchy; each kind maps to a process exit code the CLI returns."""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error Kiln reports to a user. `exit_code` is what `kiln` exits with."""

    exit_code = 1


class RecipeError(KilnError):
    """The recipe (or an override) is invalid. Carries every problem found, not only the first."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str = "recipe"):
        self.problems = problems
        self.source = source
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} is invalid ({len(problems)} problem(s)):\n{lines}")


class StageFailed(KilnError):
    """A stage raised while building; earlier stages' outputs stay in the cache."""

    exit_code = 3

    def __init__(self, stage: str, reason: str):
        self.stage = stage
        self.reason = reason
        super().__init__(f"stage '{stage}' failed: {reason}")


class QualityGateFailed(KilnError):
    """Validation measured a value outside a recipe gate."""

    exit_code = 4

    def __init__(self, failures: list[str], report_path: str):
        self.failures = failures
        self.report_path = report_path
        lines = "\n".join(f"  - {f}" for f in failures)
        super().__init__(f"{len(failures)} quality gate(s) failed (report: {report_path}):\n{lines}")


class MissingDependency(KilnError):
    """A backend cannot run here: a package or hardware is missing. The message says which."""

    exit_code = 5


class IntegrityError(KilnError):
    """An artifact's files no longer match the sha256 listed in its manifest."""

    exit_code = 6


class PromotionRefused(KilnError):
    """A promotion's gate said no (validation, staging first, challenger vs champion)."""

    exit_code = 7


class RegistryError(KilnError):
    """The model registry has no such model, version or alias, or cannot do what was asked."""

    exit_code = 8


class EngineMismatch(KilnError):
    """A hardware-specific engine (TensorRT plan) was built for another GPU or library version."""

    exit_code = 10


class StoreAccessDenied(KilnError):
    """The MLflow tracking server refused this identity (authentication or permission)."""

    exit_code = 11
