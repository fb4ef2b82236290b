"""The disentanglement scores reach the values their definitions give, and the synthetic faces
give them ground truth to intervene on.

The scores are checked on arrays: an oracle encoder (z is the factors plus small noise) must
score near each score's maximum, a random one near its minimum, a z that copies one factor
into two dimensions must lose MIG and completeness, and tiny examples are worked by hand.
The last tests run them from ``zoo bench`` on a tiny model of independent synthetic faces.
"""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from benchmarks import disentangle
from benchmarks.metric import OPT_IN_METRICS, select_metrics
from cli import app
from zoo.data import synth
from zoo.train import Trainer, TrainSettings

SIZES = (3, 2, 2, 2)  # a small product space: one three-valued factor and three binary ones


def factors(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(size, size=n) for size in SIZES], axis=1)


def oracle(f: np.ndarray, seed: int = 1) -> np.ndarray:
    return f + 0.05 * np.random.default_rng(seed).standard_normal(f.shape)


def random_codes(n: int, dims: int = 4, seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dims))


def duplicated(f: np.ndarray) -> np.ndarray:
    """The oracle with factor 0 in two dimensions."""
    codes = oracle(f)
    return np.concatenate([codes, oracle(f[:, :1], seed=5)], axis=1)


def split(codes: np.ndarray, f: np.ndarray) -> tuple[np.ndarray, ...]:
    return disentangle.fit_and_score(codes, f)


def intervention(codes_of, seed: int = 3):
    """``codes_for(factor, value, n)`` over `SIZES`: n draws with that factor fixed."""
    rng = np.random.default_rng(seed)

    def codes_for(factor: int, value: int, n: int) -> np.ndarray:
        f = np.stack([rng.integers(size, size=n) for size in SIZES], axis=1)
        f[:, factor] = value
        return codes_of(f, rng)

    return codes_for


def oracle_encoder(f, rng):
    return f + 0.05 * rng.standard_normal(f.shape)


def random_encoder(f, rng):
    return rng.standard_normal(f.shape)


# -- known answers ----------------------------------------------------------------------------


def test_mig_of_an_oracle_a_random_code_and_a_duplicated_factor():
    f = factors(1500)
    assert disentangle.mutual_information_gap(oracle(f), f)[0] > 0.95  # measured 0.99
    assert disentangle.mutual_information_gap(random_codes(1500), f)[0] < 0.05  # 0.002
    _, per_factor = disentangle.mutual_information_gap(duplicated(f), f)
    assert per_factor[0] < 0.05 and min(per_factor[1:]) > 0.95  # the copied factor has no gap


def test_mig_by_hand_on_eight_points():
    """Factor [0 0 0 0 1 1 1 1] read by a code that is 1 on one point too many: MI = H(3/8) -
    H(1/4) / 2 nats over H(f) = ln 2. A second, constant code carries nothing."""
    f = np.array([[0, 0, 0, 0, 1, 1, 1, 1]]).T
    code = np.array([[0, 0, 0, 1, 1, 1, 1, 1], [5, 5, 5, 5, 5, 5, 5, 5]], dtype=float).T

    def h(p: float) -> float:
        return -(p * math.log(p) + (1 - p) * math.log(1 - p))

    expected = (h(3 / 8) - h(1 / 4) / 2) / math.log(2)  # 0.5488
    score, _ = disentangle.mutual_information_gap(code, f, bins=2)
    assert score == pytest.approx(expected, abs=1e-9)


def test_sap_of_an_oracle_a_random_code_and_by_hand():
    f = factors(1500)
    assert disentangle.sap_score(*split(oracle(f), f))[0] > 0.95  # 0.99
    assert disentangle.sap_score(*split(random_codes(1500), f))[0] < 0.05  # 0.03
    # by hand: dimension 0 splits the binary factor exactly (adjusted balanced accuracy 1);
    # dimension 1 predicts it right on one of two of each class (0); the gap is 1 - 0 = 1
    f = np.array([[0, 0, 1, 1, 0, 0, 1, 1]]).T
    codes = np.array([[0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 0, 1, 0, 1]], dtype=float).T
    score, matrix = disentangle.sap_score(codes[:4], f[:4], codes[4:], f[4:])
    assert matrix[:, 0].tolist() == [1.0, 0.0] and score == 1.0
    # a dimension that reads three of four test points right: balanced accuracy 3/4, which
    # adjusted for chance is 2 * 3/4 - 1 = 1/2
    test = np.array([[0, 0.2, 1, 0.1]]).T
    score, _ = disentangle.sap_score(codes[:4, :1], f[:4], test, f[4:])
    assert score == pytest.approx(0.5)


def test_dci_of_an_oracle_a_random_code_and_a_duplicated_factor():
    f = factors(900)
    good = disentangle.dci(*split(oracle(f), f), trees=20)
    assert min(good["disentanglement"], good["completeness"], good["informativeness"]) > 0.9  # 1
    bad = disentangle.dci(*split(random_codes(900), f), trees=20)
    assert bad["disentanglement"] < 0.3 and bad["completeness"] < 0.3  # 0.015, 0.018
    assert bad["informativeness"] < 0.6  # about chance: 0.43
    copied = disentangle.dci(*split(duplicated(f), f), trees=20)
    # factor 0 is read from two dimensions: its completeness drops (0.60), the others' stay (1)
    assert copied["completeness_per_factor"][0] < 0.8 < min(copied["completeness_per_factor"][1:])


def test_dci_from_importance_matrices_by_hand():
    identity = np.eye(3)
    assert disentangle.disentanglement_from_importance(identity) == pytest.approx(1)
    assert disentangle.completeness_from_importance(identity) == pytest.approx(1)
    uniform = np.ones((3, 3))
    assert disentangle.disentanglement_from_importance(uniform) == pytest.approx(0)
    assert disentangle.completeness_from_importance(uniform) == pytest.approx(0)
    # one factor read from two codes equally: completeness 1 - H_2(1/2, 1/2) = 0 for it, 1 for
    # the other; both codes still matter for one factor each: disentanglement 1
    two_for_one = np.array([[0.5, 0.0], [0.5, 0.0], [0.0, 1.0]])
    assert disentangle.completeness_from_importance(two_for_one) == pytest.approx(
        (1 - math.log(2) / math.log(3) + 1) / 2
    )
    assert disentangle.disentanglement_from_importance(two_for_one) == pytest.approx(1)


def test_factor_vae_score_of_an_oracle_and_a_random_encoder():
    rng = np.random.default_rng(0)
    scale = np.std(oracle(factors(1000)), axis=0)
    good = disentangle.factor_vae_score(
        intervention(oracle_encoder), SIZES, scale, votes=60, eval_votes=60, batch=32, rng=rng
    )
    assert good["score"] > 0.95  # 1.00: the fixed factor's dimension never varies
    bad = disentangle.factor_vae_score(
        intervention(random_encoder), SIZES, np.ones(4), votes=60, eval_votes=60, batch=32, rng=rng
    )
    assert bad["score"] < 0.6  # about 1/4 for 4 factors: 0.27
    collapsed = disentangle.factor_vae_score(
        intervention(oracle_encoder), SIZES, np.zeros(4), votes=5, eval_votes=5, batch=8, rng=rng
    )
    assert collapsed == {"score": 0.0, "train_accuracy": 0.0, "active_dims": 0}


def test_beta_vae_score_of_an_oracle_and_a_random_encoder():
    rng = np.random.default_rng(0)
    good = disentangle.beta_vae_score(
        intervention(oracle_encoder), SIZES, points=80, eval_points=60, pairs=16, rng=rng
    )
    assert good["score"] > 0.95  # 1.00
    bad = disentangle.beta_vae_score(
        intervention(random_encoder), SIZES, points=80, eval_points=60, pairs=16, rng=rng
    )
    assert bad["score"] < 0.6  # about 1/4: 0.30


# -- ground truth you can intervene on --------------------------------------------------------


def test_independent_factors_are_uniform_independent_and_drawable():
    f, skipped = synth.sample_factors(6000, torch.Generator().manual_seed(0))
    assert synth.drawable(f).all()
    # bald with bangs and a moustache in a beard are skipped: 1 - (11/12) * (3/4) of draws
    assert skipped / (len(f) + skipped) == pytest.approx(1 - 11 / 12 * 3 / 4, abs=0.02)
    # what skipping costs: half the bald draws (those with bangs) and a third of the beards
    # and of the moustaches are gone, so those shares are 1/11 and 1/3 instead of 1/6 and 1/2
    column = {name: f[:, 1 + i].float() for i, name in enumerate(synth.BINARY_FACTORS)}
    hair = f[:, 0]
    assert (hair == 0).float().mean() == pytest.approx(1 / 11, abs=0.015)
    assert all((hair == v).float().mean() == pytest.approx(2 / 11, abs=0.015) for v in range(1, 6))
    assert (1 - column["No_Beard"]).mean() == pytest.approx(1 / 3, abs=0.02)
    assert column["Mustache"].mean() == pytest.approx(1 / 3, abs=0.02)
    # the factors no constraint touches stay uniform and uncorrelated
    free = torch.stack([column[name] for name in ("Eyeglasses", "Male", "Smiling", "Young")])
    assert (free.mean(dim=1) - 0.5).abs().max() < 0.03
    assert (torch.corrcoef(free) - torch.eye(4)).abs().max() < 0.05
    assert torch.equal(synth.attributes_to_factors(synth.factors_to_attributes(f)), f)


def test_fixing_one_factor_and_rerendering_with_the_same_nuisance():
    generator = torch.Generator().manual_seed(1)
    smiling = 1 + synth.BINARY_FACTORS.index("Smiling")
    f, _ = synth.sample_factors(16, generator, fixed={smiling: 1})
    assert (f[:, smiling] == 1).all() and len(torch.unique(f[:, 0])) > 1  # the rest resampled
    nuisance = synth.draw_nuisance(16, generator)
    faces = synth.render_faces(synth.factors_to_attributes(f), 32, nuisance)
    assert torch.equal(faces, synth.render_faces(synth.factors_to_attributes(f), 32, nuisance))
    frowns = f.clone()
    frowns[:, smiling] = 0
    changed = synth.render_faces(synth.factors_to_attributes(frowns), 32, nuisance) != faces
    height = faces.shape[2]
    rows = changed.any(dim=1).any(dim=2).nonzero()[:, 1]
    assert changed.any() and rows.min() > height // 2  # only the mouth, in the lower half


def test_the_default_faces_are_unchanged_by_the_nuisance_refactor():
    """The same generator gives the same faces whether nuisance is drawn inside or given."""
    attrs = synth.sample_attributes(8, torch.Generator().manual_seed(2))
    inside = synth.render_faces(attrs, 24, torch.Generator().manual_seed(3))
    given = synth.render_faces(attrs, 24, synth.draw_nuisance(8, torch.Generator().manual_seed(3)))
    assert torch.equal(inside, given)


def test_an_independent_folder_records_its_factors_and_skips(tmp_path):
    folder = synth.write_synthetic(tmp_path / "faces", 40, 16, 0, independent=True, progress=False)
    marker = json.loads((folder / "SYNTHETIC.json").read_text())
    assert marker["factors"]["hair"] == 6 and marker["skipped"] > 0
    assert synth.ground_truth(folder) is not None
    plain = synth.write_synthetic(tmp_path / "plain", 40, 16, 0, progress=False)
    assert synth.ground_truth(plain) is None
    with pytest.raises(Exception, match="not independent synthetic-faces"):
        synth.write_synthetic(plain, 40, 16, 0, independent=True, progress=False)


# -- from zoo bench ---------------------------------------------------------------------------


def test_ground_truth_metrics_are_opt_in_and_plugins_are_still_run_by_default():
    default = select_metrics()
    assert not set(OPT_IN_METRICS) & set(default)
    assert select_metrics(["mig", "fid"]) == ["mig", "fid"]


@pytest.fixture(scope="module")
def independent_vae(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gt")
    faces = synth.write_synthetic(folder / "faces", 120, 16, 0, independent=True, progress=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ZOO_CACHE_DIR", str(folder / "cache"))
        result = Trainer(
            TrainSettings(
                model="vae",
                model_config={"base_channels": 4, "max_channels": 8, "latent_dim": 4},
                data=str(faces),
                image_size=16,
                max_steps=2,
                batch_size=16,
                out=str(folder / "runs"),
                device="cpu",
            ),
            progress=False,
        ).run()
    return result.run_dir / "model.safetensors", folder


def test_zoo_bench_runs_every_ground_truth_metric(independent_vae, tmp_path, monkeypatch):
    checkpoint, folder = independent_vae
    monkeypatch.setenv("ZOO_CACHE_DIR", str(folder / "cache"))
    out = tmp_path / "results.json"
    metrics = ["mig", "sap", "dci", "factorvae", "betavae", "leakage"]
    options = [
        "dci.trees=5", "factorvae.votes=4", "factorvae.eval_votes=4", "factorvae.batch=4",
        "betavae.points=6", "betavae.eval_points=4", "betavae.pairs=2", "leakage.n_fit=40",
    ]  # fmt: skip
    args = ["bench", str(checkpoint), "--out", str(out), "--no-progress", "--device", "cpu"]
    args += [item for name in metrics for item in ("--metric", name)]
    args += [item for option in options for item in ("--option", option)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    [entry] = json.loads(out.read_text())["results"]
    assert set(entry["metrics"]) == set(metrics)
    values = entry["metrics"]
    assert 0 <= values["mig"]["mig"] <= 1 and 0 <= values["dci"]["completeness"] <= 1
    assert values["leakage"]["lower_is_better"] is False  # an unconditional model
    assert "MIG" in out.with_suffix(".md").read_text()


def test_ground_truth_metrics_refuse_data_without_it_in_one_line(tiny_vae, tmp_path):
    out = tmp_path / "results.json"
    args = ["bench", str(tiny_vae), "--metric", "mig", "--out", str(out), "--no-progress"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 1
    assert "zoo data synth --independent" in result.output and "Traceback" not in result.output


def test_without_scikit_learn_the_metrics_name_the_extra(monkeypatch):
    from benchmarks.leakage import LabelLeakage
    from zoo.errors import ZooError

    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now fails
    for metric in (disentangle.MutualInformationGap(), LabelLeakage()):
        with pytest.raises(ZooError, match=r"pip install 'zoo\[metrics\]'"):
            metric.compute(SimpleNamespace())
