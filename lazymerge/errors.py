"""The library's error tree.

Every error a user can cause derives from `LazyMergeError`, also inherits the matching built-in
(so `except ValueError` keeps working), and carries a `hint`: what to do about it. The CLI turns
any of them into one line on stderr and exit code 2; the message is made one printable line of at
most `text.MAX_MESSAGE` characters when the error is built (control characters escaped).
"""

from __future__ import annotations

from lazymerge.text import one_line

__all__ = [
    "CheckpointError",
    "ClusterError",
    "DiskSpaceError",
    "HeaderError",
    "HubError",
    "LazyMergeError",
    "MissingTensorError",
    "OutputError",
    "PlanError",
    "PlanWarning",
    "RecipeError",
    "ShapeMismatchError",
    "VocabularyError",
]


class LazyMergeError(Exception):
    """Base class of every error lazymerge raises on bad input or environment."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        # Messages quote names and values from strangers: one printable line, capped in length.
        super().__init__(one_line(message))
        if hint is not None:
            self.hint = one_line(hint)

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class HeaderError(LazyMergeError, ValueError):
    """A safetensors header (or a `.bin` archive's tensor table) is corrupt or inconsistent."""

    hint = "the file is damaged or not a checkpoint; download it again"

    def __init__(self, path: object, problem: str, *, hint: str | None = None) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}", hint=hint)


class CheckpointError(LazyMergeError, FileNotFoundError):
    """A model folder, shard or index is missing or malformed."""

    hint = "pass a model folder, a .safetensors file, or a Hub repo id"


class RecipeError(LazyMergeError, ValueError):
    """A merge recipe (YAML/JSON or API arguments) is invalid."""

    hint = "check the recipe against the README's CLI section"


class PlanError(LazyMergeError, ValueError):
    """The inputs cannot be merged as asked."""

    hint = "the models must share an architecture and a base model"


class MissingTensorError(PlanError):
    """A tensor the recipe needs is absent from one of the inputs."""

    def __init__(self, tensor: str, model: str, *, hint: str | None = None) -> None:
        self.tensor = tensor
        self.model = model
        super().__init__(f"tensor {tensor!r} is missing from {model}", hint=hint)


class ShapeMismatchError(PlanError):
    """Two inputs have the same tensor with different shapes."""

    def __init__(
        self, tensor: str, model_a: str, shape_a: tuple[int, ...], model_b: str, shape_b: tuple[int, ...]
    ) -> None:
        self.tensor = tensor
        super().__init__(f"tensor {tensor!r} has shape {list(shape_a)} in {model_a} but {list(shape_b)} in {model_b}")


class VocabularyError(PlanError):
    """The two tokenizers disagree on a token's id."""

    hint = "DogeRM needs both models to come from the same base tokenizer"


class OutputError(LazyMergeError, OSError):
    """The output folder cannot be used (it is an input, it holds a model, it is not writable)."""

    hint = "choose another --output folder"


class DiskSpaceError(OutputError):
    """Not enough free space at the destination."""

    hint = "free some space or choose an --output on a larger disk"


class HubError(LazyMergeError, RuntimeError):
    """A Hugging Face Hub call failed (bad token, missing repo, network)."""

    hint = "check the repo id and your token (HF_TOKEN or `hf auth login`)"


class ClusterError(LazyMergeError, RuntimeError):
    """A split merge could not run on a cluster (Ray missing or unreachable, a part failed)."""

    hint = "pip install 'lazymerge[ray]' on the driver and every node, and check RAY_ADDRESS"


class PlanWarning(UserWarning):
    """Something the plan does that the user may not expect (e.g. a tensor copied from one model):
    issued with `warnings.warn` when a merge is planned; the CLI prints it as one line."""
