"""One hierarchy of errors for the whole tool.

Library code raises these; only the CLI turns them into a one-line message and an exit code. Each
class also subclasses the built-in it is a kind of, so callers can catch `ValueError` and friends.
Messages name the bad value and, where there is one, the next step.
"""

from __future__ import annotations


class W2WError(Exception):
    """Base class of every error w2wreg raises on purpose."""

    exit_code = 1


# --- LoRA files --------------------------------------------------------------------------------------


class LoRAFileError(W2WError, ValueError):
    """A LoRA file (or folder) that cannot be read as a LoRA."""

    def __init__(self, path: object, problem: str, hint: str = ""):
        self.path, self.problem, self.hint = str(path), problem, hint
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


class PickleRefusedError(LoRAFileError):
    """A pickled checkpoint, refused unless the user opts in."""

    def __init__(self, path: object):
        super().__init__(
            path,
            "is a pickled checkpoint, which can run code when loaded",
            "convert it to .safetensors, or pass --allow-pickle if you trust it "
            "(it is then read with torch.load(weights_only=True))",
        )


class CorruptFileError(LoRAFileError):
    """Truncated, malformed or oversized safetensors data."""


class UnknownFormatError(LoRAFileError):
    """No known LoRA key convention matches the file's tensors."""


class ShapeError(LoRAFileError):
    """Factors whose shapes are wrong or disagree with each other."""


class NonFiniteError(LoRAFileError):
    """NaN or Inf values in the weights."""


# --- layouts and vectors -----------------------------------------------------------------------------


class LayoutMismatchError(W2WError, ValueError):
    """A vector or LoRA whose layout is not the one expected."""


class ExpressionError(W2WError, ValueError):
    """A model-arithmetic expression (`w2wreg mix`) that does not parse, type-check or evaluate.

    `column` is 0-based (None when unknown); the message counts columns from 1, as editors do, and
    draws a caret under that column when the expression text is known.
    """

    def __init__(self, problem: str, expression: str = "", column: int | None = None):
        self.problem, self.expression, self.column = problem, expression, column
        msg = f"bad expression{'' if column is None else f' at column {column + 1}'}: {problem}"
        if expression and column is not None:
            # Tabs and newlines would throw the caret off; show every whitespace as one space.
            shown = "".join(" " if c.isspace() else c for c in expression)
            msg += f"\n  {shown}\n  {' ' * column}^"
        super().__init__(msg)


# --- registry ----------------------------------------------------------------------------------------


class RegistryNotFoundError(W2WError, FileNotFoundError):
    def __init__(self, root: object):
        self.root = str(root)
        super().__init__(
            f"no registry at {root}; run `w2wreg init --registry {root}` first, or point "
            "--registry / W2WREG_HOME at an existing one"
        )


class RegistryLockedError(W2WError, TimeoutError):
    def __init__(self, root: object, timeout: float):
        super().__init__(
            f"registry {root} is held by another process (a writer, or a reader keeping it open) for over "
            f"{timeout:.0f}s; try again when it is done"
        )


class UnknownModelError(W2WError, LookupError):
    def __init__(self, ref: object, suggestions: list[str] | None = None):
        self.ref = ref
        hint = f"; did you mean {', '.join(suggestions)}?" if suggestions else "; `w2wreg ls` lists models"
        super().__init__(f"no model named or numbered {ref!r} in the registry{hint}")


class DuplicateModelError(W2WError, ValueError):
    def __init__(self, what: str, existing: str, reason: str):
        self.existing = existing
        super().__init__(f"{what}: {reason} {existing!r} already in the registry")


class NameTakenError(W2WError, ValueError):
    def __init__(self, name: str, path: object = None):
        where = f"{path}: " if path else ""
        super().__init__(f"{where}the name {name!r} is taken by another model; pass --name to choose another")


class InvalidNameError(W2WError, ValueError):
    pass


class FilterError(W2WError, ValueError):
    """A --where condition that DuckDB cannot run."""


class AttributeInputError(W2WError, ValueError):
    """Bad --attr / --attrs-csv input."""


class SpaceMismatchError(W2WError, ValueError):
    """Two models that live in different weight spaces were compared."""


class HubError(W2WError, OSError):
    """A hub repo that cannot be read or written."""


class IntegrityError(W2WError, RuntimeError):
    """verify found the registry's parts disagreeing."""


# --- attribute directions ----------------------------------------------------------------------------


class DirectionError(W2WError, ValueError):
    """Labels or coefficients from which no attribute direction can be fitted, or an unusable direction."""


# --- training datasets -------------------------------------------------------------------------------


class DatasetError(W2WError, ValueError):
    """A training dataset (identity folders of images plus attributes.csv) that cannot be used as it is."""

    def __init__(self, path: object, problem: str, hint: str = ""):
        self.path, self.problem, self.hint = str(path), problem, hint
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


# --- the weights2weights release (`w2wreg ingest --from-w2w-release`) ----------------------------------


class ReleaseError(W2WError):
    """The weights2weights release files cannot be imported as they are."""

    def __init__(self, path: object, problem: str, hint: str = ""):
        self.path, self.problem, self.hint = str(path), problem, hint
        super().__init__(f"{path}: {problem}" + (f"; {hint}" if hint else ""))


class ReleaseFileMissingError(ReleaseError, FileNotFoundError):
    """A file of the release is not in the folder given."""


class ReleaseFormatError(ReleaseError, ValueError):
    """A release file whose content is not what the release's structure says (keys, shapes, config)."""


class ReleasePickleError(ReleaseError, ValueError):
    """A release file that only a full unpickle could read, refused without --trust-pickle."""


class ReleaseDependencyError(ReleaseError, ImportError):
    """Reading a release file needs a package that is not installed (pandas, for identity_df.pt)."""


class DeviceError(W2WError, RuntimeError):
    """A device was asked for that this machine (or this build of torch) does not have."""
