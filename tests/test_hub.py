"""Hub in and out, offline: the real huggingface_hub client against the local Hub-protocol server.

Merge from repo ids (planning reads headers only), push each shard as it closes and commit once,
download back and compare bytes, a push killed mid-way and resumed without re-uploading, a wrong
token as one line, and the --low-disk / --delete-after-upload disk high-water marks.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import HfApi, hf_hub_download

import lazymerge
from lazymerge.cli import main
from lazymerge.demo import build_llama_pair
from lazymerge.errors import CheckpointError, HubError
from lazymerge.io.checkpoint import Checkpoint, open_checkpoint
from lazymerge.io.hub import HubCheckpoint, is_repo_id, open_hub_checkpoint, split_repo_id
from lazymerge.io.hub_errors import scrub

try:  # tests/ is on sys.path when it has no __init__.py (pytest rootdir import mode)
    from conftest import load_folder, write_model
    from helpers import kill_during_second_upload
    from hub_server import HubServer
except ImportError:  # pragma: no cover - tests/ became a package
    from tests.conftest import load_folder, write_model
    from tests.helpers import kill_during_second_upload
    from tests.hub_server import HubServer

TOKEN = "hf_test_token"
SHARD = "300KB"  # several output shards from the small pair below
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    """RM: fp16 safetensors, 2 shards; SFT: fp32 .bin, 2 shards, one extra token (MetaMath's layout).
    Every weight file is several times larger than a header probe."""
    rm_dir, sft_dir = build_llama_pair(tmp_path / "pair", hidden=128, layers=8, vocab=1024, inter=344)
    for folder, fmt in ((rm_dir, "safetensors"), (sft_dir, "bin")):  # more shards: disk bounds mean something
        tensors = _load_any(folder)
        for p in folder.iterdir():
            if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json"):
                p.unlink()
        write_model(folder, tensors, shards=6, fmt=fmt)
    return rm_dir, sft_dir


def _load_any(folder: Path) -> dict[str, torch.Tensor]:
    tensors = load_folder(folder)
    for f in sorted(folder.glob("*.bin")):
        tensors.update(torch.load(f, weights_only=True))
    return tensors


def upload(server: HubServer, folder: Path, repo_id: str, private: bool = False) -> None:
    api = HfApi(endpoint=server.endpoint, token=TOKEN)
    api.create_repo(repo_id, private=private)
    api.upload_folder(repo_id=repo_id, folder_path=folder)


@pytest.fixture
def remote_pair(hub: HubServer, pair: tuple[Path, Path]) -> tuple[Path, Path]:
    upload(hub, pair[0], "alice/rm", private=True)
    upload(hub, pair[1], "alice/sft")
    hub.reset_log()
    return pair


def weight_files(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")}


def download_repo(server: HubServer, repo_id: str, dest: Path) -> dict[str, bytes]:
    files = HfApi(endpoint=server.endpoint, token=TOKEN).list_repo_files(repo_id)
    return {f: Path(hf_hub_download(repo_id, f, local_dir=dest)).read_bytes() for f in files if f != ".gitattributes"}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


# ---- repo ids ----------------------------------------------------------------------------------------------


def test_is_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_repo_id("meta-math/MetaMath-7B-V1.0")
    assert is_repo_id("miulab/llama2-7b-ultrafeedback-rm@main")
    assert is_repo_id("a/b@refs/pr/1")
    assert split_repo_id("a/b@v1.0") == ("a/b", "v1.0") and split_repo_id("a/b") == ("a/b", None)
    for bad in ("model", "/abs/path", "./a/b", "a/b/c", "a--b/c", "a/b..c", "a/b@", "", "a/ b"):
        assert not is_repo_id(bad), bad
    monkeypatch.chdir(tmp_path)
    (tmp_path / "owner" / "name").mkdir(parents=True)
    assert not is_repo_id("owner/name")  # an existing local path wins


def test_scrub_masks_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "secret-token-value")
    text = scrub("401 for secret-token-value\nAuthorization: Bearer abc.def hf_abcdefghijklmnop", "other-token")
    assert "secret-token-value" not in text and "abc.def" not in text and "hf_abcdefghijklmnop" not in text
    assert "\n" not in text


# ---- merge from repo ids, push, download back ----------------------------------------------------------------


@pytest.mark.slow
def test_dogerm_from_repo_ids_plans_from_headers_then_pushes(
    hub: HubServer, remote_pair: tuple[Path, Path], tmp_path: Path
) -> None:
    rm_dir, sft_dir = remote_pair
    sizes = {"alice/rm": weight_files(rm_dir), "alice/sft": weight_files(sft_dir)}

    rm = lazymerge.open_model("alice/rm")
    sft = lazymerge.open_model("alice/sft@main")
    assert isinstance(rm, HubCheckpoint) and isinstance(sft, HubCheckpoint)
    assert rm.format == "safetensors" and sft.format == "bin"
    # the pushed plan (its first and last shards are short: `plan.with_short_edge_shards`)
    plan = lazymerge.dogerm(
        rm, sft, 0.3, tmp_path / "out", max_shard_size=SHARD, push_to_hub="alice/merged", dry_run=True
    )
    assert len(plan.shards) >= 3

    # Planning read the index, headers and side files only: every weight read was a small ranged one.
    served = [r for r in hub.requests if r.filename and r.filename.endswith((".safetensors", ".bin")) and r.bytes_sent]
    assert served and all(r.range is not None for r in served)
    weight_total = sum(sum(s.values()) for s in sizes.values())
    per_file: dict[str, int] = {}
    for r in served:
        per_file[f"{r.repo_id}/{r.filename}"] = per_file.get(f"{r.repo_id}/{r.filename}", 0) + r.bytes_sent
    for key, n in per_file.items():
        assert n <= 100_000, (key, n)  # one header probe (a .bin: its directory, data.pkl, 30 B per storage)
    before_first_download = hub.bytes_served
    assert before_first_download < weight_total / 10
    assert rm.downloads == 0 and sft.downloads == 0

    # Merge (weights fetched on demand, once each) and push.
    hub.reset_log()
    stats = lazymerge.dogerm(
        rm, sft, 0.3, tmp_path / "out", max_shard_size=SHARD, push_to_hub="alice/merged", device="cpu"
    )
    assert stats.tensors == len(plan.tensors)
    assert stats.push is not None and (stats.push.repo_id, stats.push.revision) == ("alice/merged", "main")
    assert rm.downloads == len(sizes["alice/rm"]) and sft.downloads == len(sizes["alice/sft"])
    full_gets = [r for r in hub.requests if r.method == "GET" and r.range is None and r.filename]
    assert sorted(r.filename for r in full_gets if r.filename.endswith((".safetensors", ".bin"))) == sorted(
        [*sizes["alice/rm"], *sizes["alice/sft"]]
    )

    # One commit on top of the initial one; every shard uploaded exactly once.
    repo = hub.repos["alice/merged"]
    assert len(repo.commits) == 2
    out = tmp_path / "out"
    shard_names = [s.name for s in plan.shards]
    assert len(hub.lfs_uploads) == len(shard_names)
    expected = {p.name for p in out.iterdir() if p.is_file() and p.name != "lazymerge_manifest.json"}
    assert set(hub.files("alice/merged")) == expected | {".gitattributes"}

    # Download back: byte-identical to the local output.
    back = download_repo(hub, "alice/merged", tmp_path / "back")
    assert back == {name: (out / name).read_bytes() for name in expected}

    # The same merge from the local folders gives the same tensors.
    lazymerge.dogerm(rm_dir, sft_dir, 0.3, tmp_path / "local", max_shard_size=SHARD, device="cpu")
    mine, ref = load_folder(out), load_folder(tmp_path / "local")
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)

    card = back["README.md"].decode()
    front = front_matter(card)
    assert front["base_model"] == ["alice/rm", "alice/sft"]
    assert {"merge", "lazymerge", "dogerm"} <= set(front["tags"]) and front["library_name"] == "transformers"
    assert "DogeRM" in card and "2407.01470" in card and lazymerge.__version__ in card
    assert TOKEN not in card and all(TOKEN.encode() not in b for b in back.values())


def test_cli_merge_from_repo_ids_and_push_to_branch(
    hub: HubServer, remote_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code = main(
        [
            "dogerm",
            "--reward-model",
            "alice/rm",
            "--domain-model",
            "alice/sft",
            "--weight",
            "0.5",
            "-o",
            str(out),
            "--max-shard-size",
            SHARD,
            "--push-to-hub",
            "merged",  # the token's own namespace
            "--private",
            "--revision",
            "dev",
            "--commit-message",
            "my merge",
            "--device",
            "cpu",
            "-q",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "pushed to testuser/merged@dev" in captured.out
    assert TOKEN not in captured.out + captured.err
    repo = hub.repos["testuser/merged"]
    assert repo.private
    assert set(hub.files("testuser/merged", "main")) == {".gitattributes"}  # main untouched
    files = hub.files("testuser/merged", "dev")
    assert "model.safetensors.index.json" in files and "README.md" in files and "config.json" in files
    assert any(f.endswith(".safetensors") for f in files)


# ---- interrupted push ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_push_killed_midway_then_resumed_does_not_reupload(
    hub: HubServer, pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rm_dir, sft_dir = pair
    out = tmp_path / "out"
    args = ["dogerm", "--reward-model", str(rm_dir), "--domain-model", str(sft_dir), "--weight", "0.3"]
    args += ["-o", str(out), "--max-shard-size", SHARD, "--push-to-hub", "alice/merged", "--device", "cpu", "-q"]

    # The server accepts the first shard's upload, then holds every later one until the child is dead.
    first = kill_during_second_upload(hub, *args, stdout=None, HF_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    assert len(first) == 1
    repo = hub.repos["alice/merged"]
    assert len(repo.commits) == 1 and set(hub.files("alice/merged")) == {".gitattributes"}  # nothing visible

    hub.reset_log()
    assert main([*args, "--resume"]) == 0, capsys.readouterr().err
    assert "already on the Hub" in capsys.readouterr().out
    assert first[0] not in hub.lfs_uploads  # the finished shard was not sent again
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(hub.lfs_uploads) == len(shards) - 1
    assert len(repo.commits) == 2  # the initial commit, then the whole model at once
    back = download_repo(hub, "alice/merged", tmp_path / "back")
    assert {n: back[n] for n in shards} == {n: (out / n).read_bytes() for n in shards}
    assert hashlib.sha256(back[shards[0]]).hexdigest() == first[0][0]


# ---- errors --------------------------------------------------------------------------------------------------


def test_wrong_token_is_one_line(
    hub: HubServer, remote_pair: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rm_dir, sft_dir = remote_pair
    secret = "hf_wrongwrongwrongwrong"
    base = ["dogerm", "--weight", "0.3", "-o", str(tmp_path / "out"), "-q", "--token", secret]
    for argv in (
        [*base, "--reward-model", "alice/rm", "--domain-model", "alice/sft"],  # reading
        [*base, "--reward-model", str(rm_dir), "--domain-model", str(sft_dir), "--push-to-hub", "alice/x"],  # writing
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 2 and lines[0].startswith("error:") and lines[1].startswith("hint:"), err
        assert "401" in lines[0] and "token" in lines[0]
        assert secret not in err
    assert "alice/x" not in hub.repos


def test_missing_repo_and_revision(hub: HubServer, remote_pair: tuple[Path, Path]) -> None:
    with pytest.raises(HubError, match="repository not found"):
        lazymerge.open_model("alice/nope")
    with pytest.raises(HubError, match="revision 'v9' not found"):
        lazymerge.open_model("alice/sft@v9")
    with pytest.raises(HubError, match="not in the local Hugging Face cache"):
        from huggingface_hub import constants

        old = constants.HF_HUB_OFFLINE
        constants.HF_HUB_OFFLINE = True
        try:
            lazymerge.open_model("alice/never-downloaded")
        finally:
            constants.HF_HUB_OFFLINE = old


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hub_and_local_folder_build_the_same_checkpoint(hub: HubServer, tmp_path: Path, fmt: str) -> None:
    """The same sharded folder, opened locally and from the Hub: the same tensors, files and sizes,
    and the same error when its index names a shard that lacks a tensor."""
    gen = torch.Generator().manual_seed(0)
    tensors = {f"layers.{i}.weight": torch.randn(4, 8 + i, generator=gen).half() for i in range(6)}
    good = write_model(tmp_path / "good", tensors, shards=3, fmt=fmt)
    upload(hub, good, f"alice/good-{fmt}")
    local = open_checkpoint(good, label="m")
    remote = open_hub_checkpoint(f"alice/good-{fmt}", label="m")
    assert isinstance(remote, HubCheckpoint) and type(local) is Checkpoint
    assert (remote.format, remote.files, remote.file_sizes) == (local.format, local.files, local.file_sizes)
    assert list(remote.tensors.items()) == list(local.tensors.items())
    assert remote.metadata == local.metadata
    assert local.format == fmt and len(local.files) == 3 and list(local.tensors) == list(tensors)

    bad = write_model(tmp_path / "bad", tensors, shards=3, fmt=fmt)
    index = next(bad.glob("*.index.json"))
    doc = json.loads(index.read_text())
    doc["weight_map"]["layers.0.weight"] = local.files[-1]  # a shard that exists but lacks it
    index.write_text(json.dumps(doc))
    upload(hub, bad, f"alice/bad-{fmt}")
    with pytest.raises(CheckpointError) as from_folder:
        open_checkpoint(bad, label="m")
    with pytest.raises(CheckpointError) as from_hub:
        open_hub_checkpoint(f"alice/bad-{fmt}", label="m")
    assert str(from_hub.value) == str(from_folder.value)
    assert "the index puts 'layers.0.weight' in" in str(from_folder.value)


# ---- disk high-water marks -------------------------------------------------------------------------------------


class DiskWatch:
    """Samples folder sizes from a thread and at every progress event; keeps the peaks."""

    def __init__(self, folders: dict[str, tuple[Path, Callable[[Path], bool]]]) -> None:
        self.folders = folders
        self.peak = dict.fromkeys(folders, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self, *_: object) -> None:
        for key, (folder, keep) in self.folders.items():
            total = 0
            for p in folder.rglob("*") if folder.exists() else []:
                try:
                    if p.is_file() and keep(p):
                        total += p.stat().st_size
                except OSError:
                    pass
            self.peak[key] = max(self.peak[key], total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(0.002)

    def __enter__(self) -> DiskWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


@pytest.mark.slow
def test_low_disk_and_delete_after_upload_high_water_marks(
    hub: HubServer, remote_pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    rm_dir, sft_dir = remote_pair
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))  # where --low-disk makes its private folder
    # Asked for several write lanes (as the GPU path is by default): both options keep one.
    monkeypatch.setenv("LAZYMERGE_WRITE_LANES", "3")
    out = tmp_path / "out"
    is_weight = lambda p: p.suffix in (".safetensors", ".bin") or p.name.endswith(".incomplete")  # noqa: E731
    is_shard = lambda p: p.name.endswith((".safetensors", ".safetensors.partial"))  # noqa: E731
    watch = DiskWatch({"inputs": (downloads, is_weight), "output": (out, is_shard)})

    rm = lazymerge.open_model("alice/rm", low_disk=True)
    sft = lazymerge.open_model("alice/sft", low_disk=True)
    plan = lazymerge.dogerm(rm, sft, 0.3, out, max_shard_size=SHARD, push_to_hub="alice/m", dry_run=True)
    with watch:
        lazymerge.dogerm(
            rm,
            sft,
            0.3,
            out,
            max_shard_size=SHARD,
            push_to_hub="alice/merged",
            delete_after_upload=True,
            device="cpu",
            progress=watch.sample,
        )
    largest_out = max(s.size for s in plan.shards)
    total_in = sum(weight_files(rm_dir).values()) + sum(weight_files(sft_dir).values())
    # Inputs: streamed with range requests, never on disk; each planned byte fetched once.
    assert watch.peak["inputs"] == 0
    fetched = rm.stream_stats.bytes_fetched + sft.stream_stats.bytes_fetched
    assert 0 < fetched <= total_in and rm.stream_stats.bytes_fetched <= rm.total_bytes
    assert not [r for r in hub.requests if r.filename and r.filename.endswith(".safetensors") and not r.range]
    # Output: at most two shards at a time (one uploading while the next is written); all of
    # them went to the Hub and none is left.
    assert len(plan.shards) > 2
    assert 0 < watch.peak["output"] <= 2 * largest_out < sum(s.size for s in plan.shards)
    assert not list(out.glob("*.safetensors"))
    assert len(hub.lfs_uploads) == len(plan.shards)
    # The HF cache holds no weight file; the private download folder is gone once the models are.
    cache = Path(os.environ["HF_HUB_CACHE"])
    assert all(p.stat().st_size < 100_000 for p in cache.rglob("*") if p.is_file())
    del rm, sft
    gc.collect()
    assert not any(downloads.iterdir())

    back = download_repo(hub, "alice/merged", tmp_path / "back")
    ref = tmp_path / "ref"
    lazymerge.dogerm(rm_dir, sft_dir, 0.3, ref, max_shard_size=SHARD, device="cpu")
    mine, theirs = load_folder(tmp_path / "back"), load_folder(ref)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert "model.safetensors.index.json" in back
