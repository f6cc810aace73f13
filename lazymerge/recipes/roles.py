"""Which input is the reward model and which the domain SFT model, told from headers and config.

DogeRM keeps the reward model's head and architecture, so swapping the two models, or passing two
causal LMs, would not fail: it would quietly give a causal linear merge with the reward head
dropped. The roles are checked before planning instead. A reward model is recognised by a known
head tensor (`score.*`, a TRL/OpenRLHF value head...) or a `*ForSequenceClassification`-like
architecture in config.json; a head of an unknown name is accepted and named in the plan.
"""

from __future__ import annotations

from lazymerge.errors import PlanError
from lazymerge.io.checkpoint import Checkpoint

__all__ = ["OUTPUT_HEAD_NAMES", "REWARD_HEAD_PREFIXES", "RoleError", "check_roles", "reward_heads"]

# Heads only a reward model has: sequence-classification heads, TRL's `v_head.summary.*`,
# OpenRLHF's `value_head.*`.
REWARD_HEAD_PREFIXES = ("score.", "classifier.", "v_head.", "value_head.", "reward_head.", "rm_head.")
# Vocabulary-shaped output heads a causal LM has (untied); they follow the vocabulary union.
OUTPUT_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
_CAUSAL_ARCH = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")
_REWARD_ARCH = ("ForSequenceClassification", "ForTokenClassification", "RewardModel", "ValueHead", "ForReward")


class RoleError(PlanError):
    """The models given as reward model and domain model do not play those roles."""

    hint = "--reward-model takes the reward model (a reward head), --domain-model the SFT causal LM"


def reward_heads(ckpt: Checkpoint) -> list[str]:
    """The checkpoint's tensors that belong to a known reward head."""
    return [name for name in ckpt.tensors if name.startswith(REWARD_HEAD_PREFIXES)]


def _architectures(ckpt: Checkpoint) -> list[str]:
    config = ckpt.read_json("config.json") or {}
    archs = config.get("architectures")
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def _reward_evidence(ckpt: Checkpoint) -> str | None:
    """Why `ckpt` looks like a reward model (a head tensor, an architecture), or None."""
    heads = reward_heads(ckpt)
    if heads:
        return heads[0]
    arch = next((a for a in _architectures(ckpt) if any(k in a for k in _REWARD_ARCH)), None)
    return f"architecture {arch}" if arch is not None else None


def check_roles(rm: Checkpoint, sft: Checkpoint, vocab_tensors: tuple[str, ...]) -> list[str]:
    """Check that `rm` is a reward model and `sft` a causal LM.

    Returns:
        The reward model's tensors the domain model lacks that are not a known head nor
        vocabulary-shaped (an unknown head: accepted, copied from the RM, named in the plan).

    A "reward model" with neither a head nor a sign of being a causal LM (no output head, no
    architecture: bare weight files) is taken as given.

    Raises:
        RoleError: the roles look swapped, the domain model is a reward model, or the "reward
            model" is a causal LM without any reward head (two causal LMs).
    """
    rm_why, sft_why = _reward_evidence(rm), _reward_evidence(sft)
    if sft_why is not None and rm_why is None:
        raise RoleError(
            f"the models look swapped: the domain model {sft.label} is a reward model ({sft_why}) "
            f"and the reward model {rm.label} has no reward head",
            hint="swap --reward-model and --domain-model",
        )
    if sft_why is not None:
        raise RoleError(f"the domain model {sft.label} is a reward model ({sft_why}), not a causal LM")
    unknown = [
        name
        for name in rm.tensors
        if name not in sft.tensors
        and not name.startswith(REWARD_HEAD_PREFIXES)
        and name not in OUTPUT_HEAD_NAMES
        and not name.endswith(vocab_tensors)
    ]
    archs = ", ".join(_architectures(rm))
    causal = any(a.endswith(_CAUSAL_ARCH) for a in _architectures(rm)) or any(
        n in rm.tensors for n in OUTPUT_HEAD_NAMES
    )
    if rm_why is None and not unknown and causal:
        raise RoleError(
            f"the reward model {rm.label} has no reward head (no score.* or value-head tensor"
            + (f"; architecture {archs}" if archs else "")
            + "): both models look like causal LMs"
        )
    return unknown
