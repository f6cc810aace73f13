"""mergekit's `tokenizer_source` / `tokenizer:` and `chat_template`: the output vocabulary, each
model's embedding rows, and the output tokenizer files."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lazymerge.errors import RecipeError
from lazymerge.io.checkpoint import Checkpoint, TensorRef

__all__ = ["VocabularyPlan"]


class VocabularyPlan:
    """How vocabulary-shaped tensors are laid out in the output (None: as the inputs have them)."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    @classmethod
    def from_recipe(
        cls, spec: dict, checkpoints: list[Checkpoint], index: Callable[[str], int], slices: list[Any]
    ) -> VocabularyPlan:
        if spec.get("tokenizer_source") is not None or spec.get("tokenizer") is not None:
            raise RecipeError("tokenizer_source is not supported yet")
        return cls()

    def rows_for(self, name: str, checkpoints: list[int], refs: list[TensorRef]) -> Any:
        return None

    def config_updates(self) -> dict:
        return {}

    def tokenizer_files(self, donor: Checkpoint) -> dict[str, bytes]:
        return {}
