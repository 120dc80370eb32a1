"""``HSSNHead`` and its training (docs/spec.md §11, §12): the loss terms it reports are the
public ops written out, the triplet ramp, labels untouched unless ``compat="hssn"``, all-void
batches, hierarchy-aware inference and per-level evaluation, config checks, the CLI with a
checkpoint loaded for inference, and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from protoseg_fixtures import resume_matches_a_straight_run, single_thread  # noqa: F401

import protoseg_kernels as pk
from protoseg import HSSNHead, PixelPrototypeCELoss, train, visualize
from protoseg.checkpoint import model_from_checkpoint
from protoseg.config import ConfigError, load_config
from protoseg.evaluation import ConfusionMatrix, level_summaries
from protoseg.hierarchies import build_hierarchy
from protoseg.hssn_head import triplet_factor
from protoseg.labels import downsample_labels

IGNORE = 255
# Three levels: leaves 0..5, middle nodes 6..8, roots 9..10 (V = 11).
THREE_LEVELS = pk.Hierarchy([6, 6, 7, 8, 8, 8, 9, 9, 10, -1, -1])
TWO_LEVELS = pk.Hierarchy.from_groups([[0], [1, 2, 3, 4]])


def make_inputs(seed, leaves, batch=2, size=6):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, 5, size, size, generator=g, dtype=torch.float64)
    labels = torch.randint(0, leaves, (batch, 2 * size + 1, 2 * size + 1), generator=g)  # ragged upsampling
    labels[torch.rand(labels.shape, generator=g) < 0.15] = IGNORE
    return features, labels


def make_head(hierarchy, **options):
    torch.manual_seed(0)
    defaults = {"embed_dim": 4, "ignore_index": IGNORE, "triplet_ramp_iters": 4, "max_triplet": 7,
                "focal_gamma": 2.0}
    return HSSNHead(5, hierarchy, **{**defaults, **options}).double().train()


def expected_terms(head, features, labels, step):
    """The head's terms written with the public ops and ``F.cross_entropy``."""
    hierarchy = head.hierarchy
    nodes = head.classifier(features)
    full = F.interpolate(nodes, size=labels.shape[-2:], mode="bilinear", align_corners=True)
    tree_min = pk.tree_min_loss(full, labels, hierarchy, focal_gamma=head.focal_gamma, scale=head.tree_min_scale,
                                ignore_index=IGNORE)
    level_ce = 0
    for height in range(1, hierarchy.depth + 1):
        ancestors = hierarchy.leaf_ancestors(height)
        level_labels = torch.where(labels == IGNORE, IGNORE, ancestors[labels.clamp(0, hierarchy.num_leaves - 1)])
        level_ce = level_ce + F.cross_entropy(full[:, list(hierarchy.level(height))], level_labels,
                                              ignore_index=IGNORE)
    embedding = F.normalize(head.projection(features), dim=1)
    triplet = pk.tree_triplet_loss(embedding, downsample_labels(labels, features.shape[-2:]), hierarchy,
                                   max_triplet=head.max_triplet, margin=head.triplet_margin, ignore_index=IGNORE)
    return nodes, tree_min, level_ce, triplet_factor(step, head.triplet_weight, head.triplet_ramp_iters) * triplet


@pytest.mark.parametrize("hierarchy", [TWO_LEVELS, THREE_LEVELS], ids=["two_levels", "three_levels"])
def test_the_training_terms_are_the_ops_written_out(hierarchy):
    head = make_head(hierarchy)
    for step in range(3):
        features, labels = make_inputs(step, hierarchy.num_leaves)
        output = head(features, labels)
        with torch.no_grad():
            nodes, tree_min, level_ce, triplet = expected_terms(head, features, labels, step)
        assert torch.equal(output.seg, output.nodes[:, : hierarchy.num_leaves])
        torch.testing.assert_close(output.nodes, nodes, rtol=0, atol=0)
        torch.testing.assert_close(output.tree_min, tree_min, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(output.level_ce, level_ce, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(output.triplet, triplet, rtol=1e-12, atol=1e-12)
        assert float(output.tree_min.detach()) > 0 and float(output.level_ce.detach()) > 0
    assert head.steps == 3
    assert float(output.triplet.detach()) > 0  # step 2 of a ramp of 4: f = 0.25·(1 + cos(π/2))·... > 0


def test_the_loss_adds_the_hierarchy_terms_and_every_parameter_gets_a_gradient():
    head = make_head(TWO_LEVELS, triplet_ramp_iters=0)
    features, labels = make_inputs(3, 5)
    output = head(features, labels)
    terms = PixelPrototypeCELoss(ignore_index=IGNORE)(output, labels)
    ce = F.cross_entropy(F.interpolate(output.seg, size=labels.shape[-2:], mode="bilinear", align_corners=True),
                         labels, ignore_index=IGNORE)
    torch.testing.assert_close(terms.ce, ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(terms.loss, ce + output.tree_min + output.level_ce + output.triplet,
                               rtol=1e-12, atol=1e-12)
    terms.loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and bool(parameter.grad.abs().sum() > 0), name


def test_the_triplet_weight_follows_the_cosine_ramp():
    def f(step: int, weight: float, ramp: int) -> float:
        return float(triplet_factor(torch.tensor(step), weight, ramp))

    assert f(0, 0.5, 80_000) == pytest.approx(0.0, abs=1e-15)
    assert f(40_000, 0.5, 80_000) == pytest.approx(0.25)
    assert f(20_000, 0.5, 80_000) == pytest.approx(0.25 * (1 + math.cos(math.pi * 0.75)))
    assert f(80_000, 0.5, 80_000) == 0.5 and f(10**6, 0.5, 80_000) == 0.5
    assert f(0, 0.5, 0) == 0.5


def test_the_first_step_keeps_the_projection_in_the_graph_at_weight_zero():
    head = make_head(TWO_LEVELS)
    features, labels = make_inputs(4, 5)
    output = head(features, labels)
    assert float(output.triplet.detach()) == 0 and output.triplet.requires_grad
    output.triplet.backward()
    assert all(p.grad is not None for p in head.projection.parameters())


def test_labels_are_left_alone_unless_compat_reproduces_the_original_mutation():
    features, labels = make_inputs(5, 5)
    void = labels == IGNORE
    assert bool(void.any())
    kept = labels.clone()
    make_head(TWO_LEVELS)(features, labels)
    assert torch.equal(labels, kept)

    compat = make_head(TWO_LEVELS, compat="hssn")
    output = compat(features, labels)
    assert torch.equal(labels, torch.where(void, 0, kept))  # the caller's labels: void became class 0
    with torch.no_grad():
        _, tree_min, level_ce, _ = expected_terms(compat, features, torch.where(void, 0, kept), 0)
        _, tree_min_void, _, _ = expected_terms(compat, features, kept, 0)
    torch.testing.assert_close(output.tree_min, tree_min_void, rtol=1e-12, atol=1e-12)  # mutated after tree-min
    torch.testing.assert_close(output.level_ce, level_ce, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(tree_min, tree_min_void)
    terms = PixelPrototypeCELoss(ignore_index=IGNORE)(output, labels)  # the CE sees the mutated labels too
    terms.loss.backward()  # the tree-min loss kept its own copy of the labels for backward
    assert all(p.grad is not None for p in compat.parameters())


def test_an_all_void_batch_gives_zero_terms_and_zero_gradients():
    head = make_head(TWO_LEVELS, triplet_ramp_iters=0)
    features, labels = make_inputs(6, 5)
    labels.fill_(IGNORE)
    terms = PixelPrototypeCELoss(ignore_index=IGNORE)(head(features, labels), labels)
    assert all(float(term.detach()) == 0 for term in terms)
    terms.loss.backward()
    for name, parameter in head.named_parameters():
        assert parameter.grad is not None and bool((parameter.grad == 0).all()), name


def test_evaluation_scores_and_predictions_follow_the_hierarchy_rule():
    for rule in ("softmax_sum", "path_min"):
        head = make_head(THREE_LEVELS, rule=rule).eval()
        features, labels = make_inputs(7, 6)
        output = head(features, labels)
        assert output.tree_min is None and output.triplet is None
        torch.testing.assert_close(output.seg, pk.hierarchy_scores(output.nodes, THREE_LEVELS, rule=rule))
        prediction = head.predict(output, labels.shape[-2:])
        full = F.interpolate(output.nodes.float(), size=labels.shape[-2:], mode="bilinear", align_corners=True)
        assert torch.equal(prediction, pk.hierarchy_predict(full, THREE_LEVELS, rule=rule))
        assert prediction.shape == labels.shape


def test_level_matrices_equal_a_direct_count_at_each_level():
    g = torch.Generator().manual_seed(8)
    labels = torch.randint(0, 6, (500,), generator=g)
    labels[:40] = IGNORE
    prediction = torch.randint(0, 6, (500,), generator=g)
    leaves = ConfusionMatrix(6, IGNORE)
    leaves.update(prediction, labels)
    levels = level_summaries(leaves, THREE_LEVELS)
    assert list(levels) == ["level 1", "level 2"]
    for height in (1, 2):
        ancestors = THREE_LEVELS.leaf_ancestors(height)
        direct = ConfusionMatrix(len(THREE_LEVELS.level(height)), IGNORE)
        labelled = labels != IGNORE
        direct.update(ancestors[prediction[labelled]], ancestors[labels[labelled]])
        assert torch.equal(leaves.coarsen(ancestors, direct.num_classes).counts, direct.counts)
        assert levels[f"level {height}"]["miou"] == pytest.approx(direct.mean_iou())
    with pytest.raises(ValueError, match="groups must map each of the 6 classes"):
        leaves.coarsen(torch.tensor([0, 1]), 2)


def test_bad_options_and_hierarchies_are_named():
    with pytest.raises(ValueError, match="hierarchy must be a protoseg_kernels.Hierarchy of depth >= 1"):
        HSSNHead(5, pk.Hierarchy([-1, -1, -1]))
    with pytest.raises(ValueError, match="triplet_weight must be a finite number >= 0"):
        HSSNHead(5, TWO_LEVELS, triplet_weight=-1)
    with pytest.raises(ValueError, match="rule must be one of"):
        HSSNHead(5, TWO_LEVELS, rule="max")
    with pytest.raises(ValueError, match="compat must be one of 'hssn'"):
        HSSNHead(5, TWO_LEVELS, compat="protoseg")
    head = make_head(TWO_LEVELS)
    features, labels = make_inputs(9, 5)
    labels[0, 0, 0] = 5
    with pytest.raises(ValueError, match=r"labels must hold classes in \[0, 5\) or ignore_index=255, found 5"):
        head(features, labels)
    with pytest.raises(ConfigError, match="needs model.head='hssn'"):
        load_config("demo", ("model.compat=hssn",))
    with pytest.raises(ConfigError, match="its leaves .* are not the classes of the synthetic dataset"):
        build_hierarchy("cityscapes", "synthetic", ("background", "class-A", "class-B", "class-C", "class-D"))
    with pytest.raises(ConfigError, match="the ade20k dataset has no built-in hierarchy"):
        build_hierarchy(None, "ade20k", ("wall",))


def test_the_packaged_hierarchies_fit_their_datasets(tmp_path):
    from protoseg.data.folders import CITYSCAPES_CLASSES
    from protoseg.data.synthetic import CLASS_NAMES

    assert build_hierarchy(None, "cityscapes", CITYSCAPES_CLASSES) == pk.Hierarchy.cityscapes()
    synthetic = build_hierarchy(None, "synthetic", CLASS_NAMES)
    assert synthetic.num_nodes == 7 and synthetic.names[5:] == ("stuff", "thing")
    assert synthetic.leaf_ancestors(1).tolist() == [0, 1, 1, 1, 1]
    config = load_config("cityscapes_hssn", (f"data.root={tmp_path}",))
    model = config.model
    assert (model.head, model.hierarchy, model.embed_dim, model.tree_min_scale, model.focal_gamma,
            model.triplet_weight, model.triplet_ramp_iters, model.max_triplet, model.triplet_margin,
            model.hierarchy_rule, config.optim.iters) == (
        "hssn", "cityscapes", 256, 5.0, 2.0, 0.5, 80000, 200, 0.6, "softmax_sum", 80000)


TINY = ["model.head=hssn", "model.width=8", "model.embed_dim=8", "model.triplet_ramp_iters=4",
        "model.max_triplet=20", "data.synthetic_train_images=24", "data.synthetic_val_images=6",
        "data.synthetic_image_size=32", "data.crop_size=[32,32]", "data.batch_size=4", "data.val_batch_size=3",
        "optim.optimizer=sgd", "optim.lr=0.05", "optim.iters=6", "train.log_every=2", "train.eval_every=3",
        "train.progress=false"]


def test_cli_trains_the_hssn_head_and_its_checkpoint_predicts(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert train.main(["demo", *TINY, f"train.output_dir={run_dir}"]) == 0
    out = capsys.readouterr().out
    assert "level 1 IoU %" in out and "thing" in out
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert [r["iter"] for r in steps] == [2, 4, 6]
    assert all(r["tree_min"] > 0 and r["level_ce"] > 0 and r["ppc"] == 0 for r in steps)
    assert steps[-1]["triplet"] > 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    level = metrics["levels"]["level 1"]
    assert sorted(level["iou"]) == ["stuff", "thing"] and 0 <= level["miou"] <= 1
    model, config, class_names, _ = model_from_checkpoint(run_dir / "last.pt")
    assert config.model.head == "hssn" and model.head.steps == 6
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        prediction = model.head.predict(model(images), (32, 32))
    assert prediction.shape == (2, 32, 32) and int(prediction.max()) < len(class_names)
    written = visualize.run([str(run_dir / "last.pt"), "--out", str(tmp_path / "figures")])
    assert sorted(p.name for p in written) == ["curves.png", "embedding_pca.png"]


def test_cli_trains_the_compat_mode(tmp_path):
    assert train.main(["demo", *TINY, "model.compat=hssn", "optim.iters=2", f"train.output_dir={tmp_path}"]) == 0


def test_resume_continues_identically(tmp_path, monkeypatch):
    resumed = resume_matches_a_straight_run("demo", tuple(TINY), tmp_path, monkeypatch, checkpoint_every=4)
    assert resumed.model.head.steps == 6  # the triplet ramp continued from step 4
