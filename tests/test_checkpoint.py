"""Checkpoints refuse corruption, naming the file; writes are atomic; a torn log line is
dropped on resume; the CLI reports a bad checkpoint in one line."""

from __future__ import annotations

import json

import pytest
import torch

from protoseg import train
from protoseg.checkpoint import CheckpointError, atomic_write_text, load_checkpoint, save_checkpoint
from protoseg.trainer import JsonLog

STATE = {"config": {"model": {}}, "class_names": ["a", "b"], "iteration": 3,
         "model": {"w": torch.arange(12, dtype=torch.float32).view(3, 4), "b": torch.zeros(2, dtype=torch.bfloat16)},
         "rng": [{"cpu": torch.get_rng_state(), "cuda": None}]}


def saved(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, STATE)
    return path


def test_a_saved_checkpoint_loads_back_and_torch_load_still_reads_it(tmp_path):
    path = saved(tmp_path)
    state = load_checkpoint(path)
    assert torch.equal(state["model"]["w"], STATE["model"]["w"]) and state["iteration"] == 3
    assert "checksum" in torch.load(path, weights_only=True)
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize("damage,message", [
    (lambda path: path.write_bytes(b""), "is empty"),
    (lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]), "cannot be read"),
    (lambda path: path.write_bytes(b"not a checkpoint at all"), "cannot be read"),
    (lambda path: torch.save([1, 2, 3], path), "is not a protoseg training checkpoint"),
    (lambda path: torch.save({"format_version": 2, "model": {}}, path), "lacks config, class_names"),
    (lambda path: torch.save({"format_version": 99, **STATE}, path), "has format 99"),
])
def test_unusable_files_are_refused_with_their_name(tmp_path, damage, message):
    path = saved(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and "train.resume" in str(info.value)


@pytest.mark.parametrize("where", ["tensor", "scalar"])
def test_a_flipped_bit_is_refused(tmp_path, where):
    path = saved(tmp_path)
    state = torch.load(path, weights_only=True)
    if where == "tensor":
        bits = state["model"]["w"].view(torch.int32)
        bits[1, 2] ^= 1 << 7  # one bit of one weight
    else:
        state["iteration"] = 2
    torch.save(state, path)  # the old checksum stays
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(path)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = saved(tmp_path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("protoseg.checkpoint.os.replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {**STATE, "iteration": 4})
    assert path.read_bytes() == before
    assert load_checkpoint(path)["iteration"] == 3


def test_atomic_text_and_a_torn_log_line_dropped_on_resume(tmp_path):
    atomic_write_text(tmp_path / "metrics.json", json.dumps({"miou": 0.5}))
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"miou": 0.5}
    log = JsonLog(tmp_path / "log.jsonl", enabled=True)
    for it in (1, 2, 3):
        log.write({"event": "train", "iter": it})
    with (tmp_path / "log.jsonl").open("a") as stream:
        stream.write('{"event": "train", "it')  # a crash in the middle of a record
    log.keep_until(2)
    assert [json.loads(line)["iter"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_the_cli_reports_a_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "last.pt").write_bytes(b"\0" * 100)
    code = train.main(["demo", f"train.output_dir={tmp_path}", "train.resume=auto", "optim.iters=1",
                       "train.progress=false"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("protoseg-train: error: checkpoint ") and "last.pt" in err

