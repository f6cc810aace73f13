"""The command line at its edges: no flag abbreviations, a misspelt flag named with a suggestion,
the real size message, YAML positions, `--device cuda` refused before any folder or bar,
`--resume` suggested where it applies, `inspect --revision/--token`, local path vs repo id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import cli
from huggingface_hub import HfApi

import lazymerge
from lazymerge.cli import main
from lazymerge.tiny_models import build_llama, build_llama_pair

try:
    from hub_server import HubServer
except ImportError:  # pragma: no cover
    from tests.hub_server import HubServer

TOKEN = "hf_test_token"
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return build_llama_pair(tmp_path / "pair", hidden=16, vocab=32, inter=24)


def _dogerm_args(pair: tuple[Path, Path], out: Path, *extra: str) -> list[str]:
    return ["dogerm", "--reward-model", str(pair[0]), "--domain-model", str(pair[1]), "-o", str(out), *extra]


@pytest.mark.parametrize(("flag", "suggestion"), [("--weigh", "--weight"), ("--wieght", "--weight")])
def test_abbreviated_or_misspelt_flag_is_named_with_a_suggestion(
    pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str, suggestion: str
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(_dogerm_args(pair, tmp_path / "out", flag, "0.3"))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert f"unrecognized argument {flag} (did you mean {suggestion}?)" in err
    assert "required" not in err
    with pytest.raises(SystemExit):  # `--weight=0.3` stays fine, `--weig=0.3` does not
        main(_dogerm_args(pair, tmp_path / "out", "--weig=0.3"))
    assert "unrecognized argument --weig " in capsys.readouterr().err


def test_an_option_value_that_looks_like_a_flag_is_a_value(pair: tuple[Path, Path], tmp_path: Path) -> None:
    from lazymerge.cli import _check_flags, _parser

    _check_flags(_parser(), _dogerm_args(pair, tmp_path / "o", "--weight", "0.3", "--commit-message", "--x"))


def test_bad_shard_size_shows_the_size_message(pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, *_dogerm_args(pair, tmp_path / "out", "--weight", "0.3", "--max-shard-size", "5gigs"))
    assert code == 2 and "not a size: '5gigs'" in err and "try 5GB" in err


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "bad.yml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: a\n   parameters: {weight: 0.5}\n")
    code, _, err = cli(capsys, "merge", cfg, "-o", tmp_path / "out")
    assert code == 2 and "(line 4, column 4)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    cfg = tmp_path / "bad.json"
    cfg.write_text('{"merge_method": "linear",\n "models": [}')
    code, _, err = cli(capsys, "merge", cfg, "-o", tmp_path / "out")
    assert code == 2 and "(line 2, column 13)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: --device cuda would run")
def test_device_cuda_without_gpu_leaves_no_folder_and_no_bar(pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    code, _, err = cli(capsys, *_dogerm_args(pair, out, "--weight", "0.3", "--device", "cuda"))
    assert code == 2 and "--device cuda: no CUDA device" in err
    assert not out.exists()
    assert "%" not in err and "MB/s" not in err  # no progress bar was drawn
    with pytest.raises(lazymerge.LazyMergeError, match="cuda"):
        lazymerge.dogerm(*pair, 0.3, out, device="cuda")
    assert not out.exists()


def test_ctrl_c_suggests_resume(pair: tuple[Path, Path], tmp_path: Path, capsys, monkeypatch) -> None:
    import lazymerge.api

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(lazymerge.api, "dogerm", interrupted)
    code, _, err = cli(capsys, *_dogerm_args(pair, tmp_path / "out", "--weight", "0.3"))
    assert code == 130 and "--resume" in err


def test_folder_with_part_of_a_run_suggests_resume(pair: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    args = _dogerm_args(pair, out, "--weight", "0.3", "--max-shard-size", "2KB", "-q")
    assert main(args) == 0
    code, _, err = cli(capsys, *args)
    assert code == 2 and "already holds a model" in err and "--resume" in err
    sorted(out.glob("model-*.safetensors"))[-1].unlink()  # as if killed before the last shard
    code, _, err = cli(capsys, *args)
    assert code == 2 and "holds part of an earlier lazymerge run" in err and "pass --resume" in err
    assert main([*args, "--resume"]) == 0


def test_inspect_takes_revision_and_token(hub: HubServer, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model = build_llama(tmp_path / "m", 1)
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("alice/m", private=True)
    api.upload_folder(repo_id="alice/m", folder_path=model)
    api.create_branch("alice/m", branch="v1")
    code, out, err = cli(capsys, "inspect", "alice/m", "--revision", "v1", "--token", TOKEN)
    assert code == 0, err
    assert "model.embed_tokens" in out or "tensors" in out
    assert TOKEN not in out + err
    code, _, err = cli(capsys, "inspect", str(model), "--revision", "v1")
    assert code == 2 and "--revision applies to a Hub repo id" in err


def test_local_typo_that_looks_like_a_repo_id_names_both(hub: HubServer, tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    build_llama(tmp_path / "models" / "llama", 1)
    code, _, err = cli(capsys, "inspect", "models/lama", "--token", TOKEN)
    assert code == 2
    assert err.startswith("error: models/lama") and "no local folder 'models/lama' either" in err
    assert "did you mean the local folder 'models/llama'?" in err
    code, _, err = cli(capsys, "inspect", "models/zzzzz", "--token", TOKEN)
    assert code == 2 and "if you meant a local folder, check the path" in err
