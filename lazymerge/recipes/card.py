"""The model card (README.md) written next to a merged model."""

from __future__ import annotations

import json

__all__ = ["model_card"]

_DOGERM_TEXT = """\
This is a **DogeRM** merge (Lin, Li, Lee and Chen, *DogeRM: Equipping Reward Models with Domain
Knowledge through Model Merging*, EMNLP 2024): a general reward model and a domain SFT model
fine-tuned from the same base are merged parameter-wise,
`theta = (1 - lambda) * theta_RM + lambda * theta_SFT`, with lambda = {weight:g}. The reward head
comes from the reward model, the SFT language-model head is dropped, and the token embedding
covers the union of both vocabularies (shared tokens averaged; a token only one model has keeps
that model's row: unlike the paper's script, a reward-model-only row is kept, not re-initialised).

```bibtex
@inproceedings{{lin-etal-2024-dogerm,
  title = "{{D}}oge{{RM}}: Equipping Reward Models with Domain Knowledge through Model Merging",
  author = "Lin, Tzu-Han and Li, Chen-An and Lee, Hung-yi and Chen, Yun-Nung",
  booktitle = "Proceedings of the 2024 Conference on Empirical Methods in Natural Language Processing",
  year = "2024",
  url = "https://arxiv.org/abs/2407.01470"
}}
```
"""


def model_card(recipe: dict, base_models: list[str]) -> str:
    """A README.md with YAML front matter (base_model, tags, library_name) and the recipe."""
    from lazymerge import __version__

    lines = ["---", "base_model:"]
    lines += [f"- {json.dumps(m)}" for m in base_models]
    lines += ["library_name: transformers", "tags:", "- merge", "- lazymerge"]
    if recipe.get("merge_method") == "dogerm":
        lines.append("- dogerm")
    lines += ["---", "", "# Merged model", ""]
    lines.append(f"Made with [lazymerge](https://pypi.org/project/lazymerge/) {__version__} from:")
    lines += [""] + [f"- `{m}`" for m in base_models] + [""]
    if recipe.get("merge_method") == "dogerm":
        lines += [_DOGERM_TEXT.format(weight=recipe.get("weight", 0.0))]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)
