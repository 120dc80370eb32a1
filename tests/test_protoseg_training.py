"""The training CLI end to end on a tiny config: logs, metrics, checkpoints, resume,
figures, and clear errors for bad configs and missing paths."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from protoseg_fixtures import (  # noqa: F401
    assert_same_state,
    single_thread,
    train_until_first_checkpoint,
    write_tiny_training_config,
)

from protoseg import train, visualize
from protoseg.checkpoint import load_checkpoint, model_from_checkpoint
from protoseg.config import ConfigError, load_config
from protoseg.data import build_datasets
from protoseg.trainer import Trainer


@pytest.fixture
def tiny_config(tmp_path):
    return write_tiny_training_config(tmp_path)


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_cli_trains_evaluates_logs_and_checkpoints(tiny_config, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main([str(tiny_config), f"train.output_dir={run_dir}"]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "class-A" in printed
    records = read_log(run_dir)
    assert [r["iter"] for r in records if r["event"] == "train"] == [2, 4, 6]
    assert [r["iter"] for r in records if r["event"] == "eval"] == [3, 6]
    assert all(r["ppc"] > 0 and r["ppd"] > 0 for r in records if r["event"] == "train")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0 <= metrics["miou"] <= 1 and set(metrics["iou"]) == {"background", "class-A", "class-B", "class-C",
                                                                  "class-D"}
    state = load_checkpoint(run_dir / "last.pt")
    assert state["iteration"] == 6 and state["last_eval"] == metrics


def test_checkpoint_round_trip_gives_identical_outputs(tiny_config, tmp_path):
    config = load_config(str(tiny_config), (f"train.output_dir={tmp_path / 'run'}", "optim.iters=2"))
    trainer = Trainer(config)
    trainer.train()
    model, loaded_config, class_names, _ = model_from_checkpoint(tmp_path / "run" / "last.pt")
    assert loaded_config == config and class_names == trainer.class_names
    images = torch.stack([trainer.data.val[i][0] for i in range(3)])
    trainer.model.eval()
    with torch.no_grad():
        assert torch.equal(model(images).seg, trainer.model(images).seg)
    assert torch.equal(model.head.prototypes, trainer.model.head.prototypes)
    assert model.head.steps == trainer.model.head.steps == 2


def test_resume_continues_identically(tiny_config, tmp_path, monkeypatch):
    # Gumbel draws use the global random generator, so its state must be restored too.
    common = ("model.assignment=gumbel", "train.checkpoint_every=4", "model.warmup_iters=1")
    straight = Trainer(load_config(str(tiny_config), (f"train.output_dir={tmp_path / 'a'}", *common)))
    straight.train()

    interrupted = Trainer(load_config(str(tiny_config), (f"train.output_dir={tmp_path / 'b'}", *common)))
    train_until_first_checkpoint(interrupted, monkeypatch)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["iteration"] == 4

    resumed = Trainer(load_config(str(tiny_config), (f"train.output_dir={tmp_path / 'b'}", "train.resume=auto",
                                                      *common)))
    assert resumed.iteration == 4
    resumed.train()
    assert_same_state(straight.model.state_dict(), resumed.model.state_dict())
    strip = [{k: v for k, v in r.items() if k != "seconds_per_iter"} for r in read_log(tmp_path / "a")]
    assert strip == [{k: v for k, v in r.items() if k != "seconds_per_iter"} for r in read_log(tmp_path / "b")]


def test_resume_refuses_another_model(tiny_config, tmp_path):
    Trainer(load_config(str(tiny_config), (f"train.output_dir={tmp_path}", "optim.iters=1"))).train()
    with pytest.raises(ConfigError, match="model config differs"):
        Trainer(load_config(str(tiny_config), (f"train.output_dir={tmp_path}", "train.resume=auto",
                                               "model.num_prototypes=3")))


def test_visualize_writes_the_figures(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main([str(tiny_config), f"train.output_dir={run_dir}", "optim.iters=2"]) == 0
    written = visualize.run([str(run_dir / "last.pt"), "--out", str(tmp_path / "figures"), "--class", "class-B",
                             "--images", "2"])
    names = sorted(p.name for p in written)
    assert names == ["curves.png", "embedding_pca.png", "similarity_class-B.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_similarity_maps_share_a_colour_range_spanning_their_values():
    from protoseg.figures import similarity_range

    maps = [torch.linspace(0.2, 0.6, 101).reshape(1, 1, 101), torch.full((1, 3, 3), 0.4)]
    low, high = similarity_range(maps)
    values = torch.cat([m.flatten() for m in maps])
    assert 0.2 <= low < 0.21 and 0.59 < high <= 0.6  # the maps' own percentiles, not [-1, 1]
    assert ((values >= low) & (values <= high)).float().mean() >= 0.95
    low, high = similarity_range([torch.full((2, 4, 4), 0.7)])
    assert low < 0.7 < high  # a constant map still gets a range


def test_visualize_linear_checkpoint_draws_curves_only(tiny_config, tmp_path):
    run_dir = tmp_path / "run"
    assert train.main([str(tiny_config), f"train.output_dir={run_dir}", "optim.iters=2", "model.head=linear"]) == 0
    written = visualize.run([str(run_dir / "last.pt")])
    assert [p.name for p in written] == ["curves.png"]


@pytest.mark.parametrize("name", ["cityscapes", "ade20k"])
def test_packaged_dataset_configs_load(name, tmp_path):
    config = load_config(name, (f"data.root={tmp_path}",))
    assert config.data.dataset == name and config.model.backbone == "resnet50"


def test_packaged_demo_config_loads():
    config = load_config("demo")
    assert config.data.dataset == "synthetic" and config.model.head == "protoseg"
    assert build_datasets(load_config("demo", ("data.synthetic_train_images=16",
                                               "data.synthetic_val_images=4")).data).class_names[0] == "background"


@pytest.mark.parametrize("argv, message", [
    (["optim.lrr=0.1"], "unknown key in section 'optim' 'lrr'; did you mean 'lr'"),
    (["optimizer.lr=0.1"], "unknown config section 'optimizer'; did you mean 'optim'"),
    (["optim.lr=fast"], "optim.lr must be of type float, got 'fast'"),
    (["optim.lr=-1"], "optim.lr must be > 0"),
    (["model.head=mlp"], "model.head must be one of 'protoseg', 'linear'"),
    (["data.crop_size=[32]"], r"data.crop_size must be a list of 2 numbers"),
    (["lr=0.1"], "must look like section.key=value"),
    (["data.dataset=cityscapes"], "data.root must name the cityscapes folder"),
    (["model.compat=protoseg", "model.assignment=argmax"], "uses the Gumbel assignment"),
    (["no_such_config"], "config file 'no_such_config' not found"),
])
def test_bad_configs_give_clear_errors(argv, message, capsys):
    assert train.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("protoseg-train: error: ") and message in err, err


def test_missing_data_folder_gives_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert train.main(["data.dataset=ade20k", f"data.root={missing}", f"train.output_dir={tmp_path}"]) == 2
    assert f"ADE20K root folder not found: {missing}" in capsys.readouterr().err


def test_missing_resume_checkpoint_gives_a_clear_error(tiny_config, tmp_path, capsys):
    argv = [str(tiny_config), f"train.output_dir={tmp_path}", f"train.resume={tmp_path / 'none.pt'}"]
    assert train.main(argv) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_config_file_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2]\n")
    assert train.main([str(bad)]) == 2
    assert "section 'model'" in capsys.readouterr().err
    bad.write_text("model: {head: protoseg\n")
    assert train.main([str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_print_config(capsys):
    assert train.main(["demo", "optim.iters=7", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["optim"]["iters"] == 7 and printed["model"]["head"] == "protoseg"
