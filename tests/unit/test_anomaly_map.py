# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Anomaly maps, the scorings, the odd-frame check and the per-class leave-one-out record."""

import pytest
import torch

from anomalib_resad import ResADInputError
from anomalib_resad.anomaly_map import AnomalyMapGenerator, SeparableGaussianBlur
from anomalib_resad.calibration import (
    BOUNDARY_FLOOR,
    ScoreComponents,
    Scoring,
    boundary,
    leave_one_out_banks,
    leave_one_out_scoring,
)


def level(log_normal: float, log_abnormal: float = -50.0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((1, size, size), log_normal), torch.full((1, size, size), log_abnormal)


def covered(similarities: list[torch.Tensor]) -> list[torch.Tensor]:
    """Coverage of a fully covered bank (no reverse dissimilarity)."""
    return [torch.ones(len(similarity), 4) for similarity in similarities]


def components(generator: AnomalyMapGenerator, levels: list, constants: torch.Tensor, similarity: float = 1.0,
               similarities: list[torch.Tensor] | None = None) -> ScoreComponents:  # fmt: skip
    if similarities is None:
        similarities = [torch.full_like(log_normal, similarity) for log_normal, _ in levels]
    return generator.components(levels, similarities, covered(similarities), (8, 8), constants)


def record(levels: int = 1, **values: float) -> Scoring:
    """A scoring record with the given values (1 where not given: boundaries at the floor) and level constants 0."""
    fields = {name: torch.tensor(float(values.get(name, 1.0))) for name in Scoring.names()[1:]}
    fields["averaging"] = torch.tensor(float(values.get("averaging", 0.0)))
    return Scoring(level_constants=torch.zeros(levels), **fields)


def score(generator: AnomalyMapGenerator, levels: list, similarities: list, scoring: Scoring,
          coverage: list | None = None, averaged: list | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    return generator(levels, similarities, coverage or covered(similarities), (8, 8), scoring, averaged)


def test_likelihood_at_or_above_the_constant_is_normal_and_below_is_anomalous() -> None:
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0)
    at_constant = components(generator, [level(0.0)], torch.zeros(1))
    torch.testing.assert_close(at_constant.anomaly_map, torch.zeros(1, 1, 8, 8), atol=1e-6, rtol=0)
    above = components(generator, [level(5.0)], torch.zeros(1))  # a flow's over-confident likelihood: not negative
    torch.testing.assert_close(above.anomaly_map, torch.zeros(1, 1, 8, 8), atol=1e-6, rtol=0)
    below = components(generator, [level(-1.0)], torch.zeros(1))
    assert float(below.anomaly_map.min()) > 0
    shifted = components(generator, [level(0.0)], torch.ones(1))  # a higher constant: the same map is anomalous
    assert float(shifted.anomaly_map.min()) > 0


def test_lower_likelihood_means_higher_map() -> None:
    generator = AnomalyMapGenerator(num_levels=2)
    likely = components(generator, [level(1.0, -3.0)] * 2, torch.ones(2))
    unlikely = components(generator, [level(-2.0, -1.0)] * 2, torch.ones(2))
    assert float(unlikely.map_max) > float(likely.map_max)


def test_dissimilarity_is_mean_one_minus_match_similarity() -> None:
    generator = AnomalyMapGenerator(num_levels=2)
    result = components(generator, [level(0.0), level(0.0)], torch.zeros(2), similarity=0.75)
    torch.testing.assert_close(result.dissimilarity, torch.tensor([0.25]))
    torch.testing.assert_close(result.level_max_log_likelihood, torch.zeros(1, 2))


def test_the_paper_scoring_is_the_flows_map_in_units_of_its_threshold() -> None:
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0, scoring="paper", sensitivity=0.5)
    raw = components(generator, [level(-1.0)], torch.zeros(1))
    scoring = record(map_max=1.5, paper_defects=3.0)  # boundary 1 + 0.5 (3 - 1) = 2 relative units
    anomaly_map, image_score = score(generator, [level(-1.0)], [torch.ones(1, 4, 4)], scoring)
    torch.testing.assert_close(anomaly_map, raw.anomaly_map / 3.0)  # the leave-one-out maximum x the boundary
    torch.testing.assert_close(image_score, raw.map_max / 3.0)


def test_the_sensitivity_is_applied_where_the_class_is_scored() -> None:
    """A sensitivity set on a model holding a class takes effect at once: the record holds measurements."""
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0, scoring="paper")
    similarities, scoring = [torch.ones(1, 4, 4)], record(paper_defects=3.0)
    _, at_default = score(generator, [level(-1.0)], similarities, scoring)
    generator.sensitivity = 1.0  # the boundary at its floor, just above the references' largest score
    _, at_floor = score(generator, [level(-1.0)], similarities, scoring)
    torch.testing.assert_close(at_floor, at_default * (1 + 0.65 * 2) / BOUNDARY_FLOOR)


@pytest.mark.parametrize(
    ("name", "sensitivity", "expected"),
    [
        ("nearest", 0.35, 1 + 0.65 * (3.0 - 1)),  # 65 % of the way from the references (1) to the defects (3)
        ("fused", 0.35, 0.9 + 0.65 * (2.9 - 0.9)),  # the fused references' largest score is its own
        ("fused", 1.0, 0.9 * 1.04),  # at most sensitivity: the floor, 1.04 x the references' largest score
        ("nearest", 0.0, 3.0),
        ("paper", 0.35, 1.04),  # defects that do not stand out: the floor (no reference flagged)
    ],
)
def test_the_boundary_sits_between_the_references_and_their_defects(name: str, sensitivity: float,
                                                                     expected: float) -> None:  # fmt: skip
    scoring = record(fused_max=0.9, fused_defects=2.9, nearest_defects=3.0, paper_defects=0.5)
    assert float(boundary(scoring, name, sensitivity)) == pytest.approx(expected)


def test_defects_that_barely_stand_out_leave_the_boundary_at_its_floor() -> None:
    # chest CT's: 1 + 0.65 x 0.05 would put the boundary on the references' largest score
    scoring = record(nearest_defects=1.05)
    assert float(boundary(scoring, "nearest")) == pytest.approx(BOUNDARY_FLOOR)
    assert float(boundary(scoring, "nearest", floor=1.0)) == pytest.approx(1 + 0.65 * 0.05)
    assert float(boundary(record(nearest_defects=1.2), "nearest")) == pytest.approx(1 + 0.65 * 0.2)  # above it


def test_a_sensitivity_outside_0_1_is_refused() -> None:
    from anomalib_resad.errors import ResADConfigurationError

    with pytest.raises(ResADConfigurationError, match=r"sensitivity=1.5 is outside \[0, 1\]"):
        AnomalyMapGenerator(num_levels=1, sensitivity=1.5)


def test_a_frame_unlike_the_references_scores_above_the_threshold_whatever_its_likelihood() -> None:
    generator = AnomalyMapGenerator(num_levels=1, scoring="paper")
    # a blank frame: the flow finds it perfectly likely, but its features match the references badly
    _, image_score = score(generator, [level(10.0)], [torch.full((1, 4, 4), 0.5)], record(dissimilarity_max=0.1))
    assert float(image_score) == pytest.approx(0.5 / (2.0 * 0.1))  # over its margin (2) x its maximum


def test_the_odd_frame_check_sets_labels_without_reordering_the_frames_it_passes() -> None:
    generator = AnomalyMapGenerator(num_levels=1, scoring="paper")
    scoring = record(dissimilarity_max=0.1)  # threshold 0.2
    likely, unlikely = level(10.0), level(-1.0)  # flow score 0 and > 0
    # below its threshold (0.19 / 0.2 < 1) the dissimilarity does not lift a score: the two keep their order
    _, quiet = score(generator, [likely], [torch.full((1, 4, 4), 0.81)], scoring)
    _, scored = score(generator, [unlikely], [torch.full((1, 4, 4), 0.99)], scoring)
    assert float(quiet) < 1 and float(quiet) < float(scored)
    # above it, the frame is flagged whatever its flow score
    _, odd = score(generator, [likely], [torch.full((1, 4, 4), 0.7)], scoring)
    assert float(odd) == pytest.approx(0.3 / 0.2)


def test_scoring_without_a_record_is_a_clear_error() -> None:
    generator = AnomalyMapGenerator(num_levels=1)
    with pytest.raises(ResADInputError, match="no calibrated references"):
        generator([level(0.0)], [torch.ones(1, 4, 4)], [torch.ones(1, 4)], (8, 8))


def fake_scores(level_max: list[list[float]], values: list[float], dissimilarities: list[float],
                nearest: list[float] | None = None, reverse: list[float] | None = None):  # fmt: skip
    """A scorer of k references: image i has these level maxima, map value, dissimilarities, nearest score."""
    nearest = nearest or [0.0] * len(values)
    reverse = reverse or [0.0] * len(values)
    calls = []

    def score_reference(index: int, constants: torch.Tensor) -> ScoreComponents:
        calls.append((index, constants.clone()))
        value = torch.tensor([values[index] + float(constants.sum())])  # depends on the constants it is given
        near = torch.tensor([nearest[index]])
        return ScoreComponents(
            value.view(1, 1, 1, 1), value, torch.tensor([dissimilarities[index]]), torch.tensor([level_max[index]]),
            near, torch.tensor([reverse[index]]), torch.zeros(1), near.view(1, 1, 1, 1), torch.zeros(1, 1, 1, 1),
        )  # fmt: skip

    return score_reference, calls


def test_leave_one_out_rule_constants_then_maxima() -> None:
    score_reference, calls = fake_scores(
        [[1.0, -2.0], [3.0, -5.0], [2.0, -1.0]],
        [0.1, 0.3, 0.2],
        [0.05, 0.1, 0.2],
        nearest=[0.6, 0.4, 0.5],
        reverse=[0.3, 0.1, 0.2],
    )
    scoring = leave_one_out_scoring(score_reference, 3, 2)
    torch.testing.assert_close(scoring.level_constants, torch.tensor([3.0, -1.0]))  # per-level max over refs
    # the largest value scored *with* those constants (sum 2.0 added by the fake scorer)
    assert float(scoring.map_max) == pytest.approx(2.3)
    assert float(scoring.dissimilarity_max) == pytest.approx(0.2)
    assert float(scoring.nearest_max) == pytest.approx(0.6)
    assert float(scoring.reverse_dissimilarity_max) == pytest.approx(0.3)
    assert float(scoring.averaging) == 0.0  # no defects scored: precise matching
    # the fused score's own largest: each map over its maximum (2.3, 0.6), averaged, the largest over the references
    assert float(scoring.fused_max) == pytest.approx(
        max((2.1 / 2.3 + 1) / 2, (1 + 0.4 / 0.6) / 2, (2.2 / 2.3 + 0.5 / 0.6) / 2)
    )
    assert float(scoring.nearest_defects) == 0.0  # not measured: boundaries at the floor over the references' scores
    assert sorted({index for index, _ in calls}) == [0, 1, 2]  # every reference left out in turn
    with pytest.raises(ResADInputError, match="k >= 2"):
        leave_one_out_scoring(score_reference, 1, 2)


def test_non_finite_leave_one_out_scores_are_refused() -> None:
    score_reference, _ = fake_scores([[1.0], [1.0]], [float("nan"), 0.1], [0.1, 0.1])
    with pytest.raises(ResADInputError, match="not finite"):
        leave_one_out_scoring(score_reference, 2, 1)


def test_leave_one_out_banks_leave_out_every_view_of_the_image_scored() -> None:
    shallow = torch.arange(3.0).reshape(3, 1, 1, 1)  # 3 images, 1 view each
    deep = torch.arange(12.0).reshape(12, 1, 1, 1)  # 3 images, 4 views each (image i: rows 4i .. 4i + 3)
    banks = list(leave_one_out_banks([shallow, deep], [1, 4]))
    assert [index for index, _, _ in banks] == [0, 1, 2]
    _, query, others = banks[1]
    assert query[0].flatten().tolist() == [1.0] and query[1].flatten().tolist() == [4.0]  # image 1 itself
    assert others[0].flatten().tolist() == [0.0, 2.0]
    assert others[1].flatten().tolist() == [0.0, 1.0, 2.0, 3.0, 8.0, 9.0, 10.0, 11.0]


def test_the_record_round_trips_by_name_and_refuses_a_partial_one() -> None:
    scoring = record(levels=3, map_max=0.5, nearest_max=2.0, averaging=1.0)
    restored = Scoring.from_tensors({name: value.numpy() for name, value in scoring.tensors().items()})
    for name in Scoring.names():
        torch.testing.assert_close(getattr(restored, name), getattr(scoring, name))
    partial = {name: value for name, value in scoring.tensors().items() if name != "averaging"}
    with pytest.raises(ResADInputError, match=r"lacks \['averaging'\]"):
        Scoring.from_tensors(partial)


def test_nearest_score_is_the_blurred_match_distance_of_the_two_deepest_levels() -> None:
    generator = AnomalyMapGenerator(num_levels=3, sigma=1.0)
    likelihoods = [level(0.0), level(0.0), level(0.0)]
    shallow_bad = [torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.ones(1, 4, 4)]  # cos 0 at the shallowest level
    assert float(components(generator, likelihoods, torch.zeros(3), similarities=shallow_bad).nearest) == 0.0
    deep = [torch.ones(1, 4, 4), torch.full((1, 4, 4), 0.75), torch.full((1, 4, 4), 0.5)]
    # constant maps: 1 - cos summed over the two deepest levels, unchanged by upsampling and blurring
    nearest = components(generator, likelihoods, torch.zeros(3), similarities=deep).nearest
    torch.testing.assert_close(nearest, torch.tensor([0.75]))


def test_the_fused_image_score_is_the_fused_maps_maximum() -> None:
    scoring = record(map_max=1.0, nearest_max=0.25, dissimilarity_max=10.0)  # relative: over 1.0 and 0.25
    similarities = [torch.full((1, 4, 4), 0.5)]  # nearest score 0.5 -> ratio 2
    flows = AnomalyMapGenerator(num_levels=1, sigma=1.0, scoring="paper")
    fused = AnomalyMapGenerator(num_levels=1, sigma=1.0)
    raw = components(flows, [level(-1.0)], torch.zeros(1), similarities=similarities)
    fused_map, fused_score = score(fused, [level(-1.0)], similarities, scoring)
    # constant maps: the mean of the flows' map and the nearest ratio everywhere (boundaries at their floor)
    torch.testing.assert_close(fused_score, (raw.map_max / 1.0 + 0.5 / 0.25) / 2 / BOUNDARY_FLOOR)
    torch.testing.assert_close(fused_score, fused_map.flatten(start_dim=1).amax(dim=1))
    nearest = AnomalyMapGenerator(num_levels=1, sigma=1.0, scoring="nearest")
    _, nearest_score = score(nearest, [level(-1.0)], similarities, scoring)
    # the flows' map plays no part
    torch.testing.assert_close(nearest_score, torch.tensor([0.5 / 0.25 / BOUNDARY_FLOOR]))


def test_the_fused_score_rewards_flows_and_matching_agreeing_on_the_place() -> None:
    # the flows see one defect in the top-left corner; the matching sees one either there or in the far corner
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0)
    scoring = record(map_max=0.8, nearest_max=0.8, dissimilarity_max=100.0, reverse_dissimilarity_max=100.0)
    log_normal = torch.zeros(1, 8, 8)
    log_normal[0, 0, 0] = -20.0
    likelihoods = [(log_normal, torch.full((1, 8, 8), -50.0))]
    same, other = torch.ones(1, 8, 8), torch.ones(1, 8, 8)
    same[0, 0, 0], other[0, 7, 7] = 0.0, 0.0
    parts = generator.components(likelihoods, [other], covered([other]), (8, 8), torch.zeros(1))
    _, agreeing = score(generator, likelihoods, [same], scoring)
    _, apart = score(generator, likelihoods, [other], scoring)
    assert agreeing > apart
    assert apart < (parts.map_max + parts.nearest) / 2  # the mean of the terms' own maxima would not tell them apart


def test_a_class_that_chose_averaging_is_scored_with_the_averaged_map() -> None:
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0, scoring="nearest")
    similarities, averaged = [torch.full((1, 4, 4), 0.5)], [torch.full((1, 4, 4), 3.0)]
    precise_record = record(nearest_max=0.4, averaged_max=2.0)
    _, precise = score(generator, [level(0.0)], similarities, precise_record, None, averaged)
    chosen = record(nearest_max=0.4, averaged_max=2.0, averaging=1.0)
    _, pooled = score(generator, [level(0.0)], similarities, chosen, None, averaged)
    torch.testing.assert_close(precise, torch.tensor([0.5 / 0.4 / BOUNDARY_FLOOR]))
    torch.testing.assert_close(pooled, torch.tensor([3.0 / 2.0 / BOUNDARY_FLOOR]))


def test_files_of_another_format_are_refused_naming_what_to_do(tmp_path) -> None:
    import json

    import numpy as np

    from anomalib_resad.deploy import FORMAT_VERSION, METADATA_FILE, ReferenceConditionedInferencer, load_references

    (tmp_path / METADATA_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION - 1}))
    with pytest.raises(ResADInputError, match=r"older anomalib-resad .*resad export --checkpoint"):
        ReferenceConditionedInferencer(tmp_path)
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ResADInputError, match=r"newer anomalib-resad .*Upgrade"):
        ReferenceConditionedInferencer(tmp_path)
    path = tmp_path / "refs.npz"
    np.savez(path, metadata=np.array(json.dumps({"format_version": FORMAT_VERSION + 1})))  # arrays named otherwise
    with pytest.raises(ResADInputError, match=r"newer anomalib-resad .*Upgrade"):
        load_references(path)


def test_the_reverse_dissimilarity_flags_a_frame_that_covers_little_of_the_references() -> None:
    """The case of a black frame against circuit-board references: every frame position matches the references'
    uniform background (forward dissimilarity 0), while the references' tracks find nothing like them in the frame."""
    generator = AnomalyMapGenerator(num_levels=2, sigma=1.0, scoring="paper")
    scoring = record(levels=2, dissimilarity_max=0.1, reverse_dissimilarity_max=0.25 / 1.5)  # reverse threshold 0.25
    likely = [level(0.0), level(0.0)]
    similarities = [torch.ones(1, 4, 4), torch.ones(1, 2, 2)]  # forward: perfectly matched
    coverage = [torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.2]])]  # half, then 0.4 unmatched
    parts = generator.components(likely, similarities, coverage, (8, 8), torch.zeros(2))
    torch.testing.assert_close(parts.reverse_dissimilarity, torch.tensor([(0.5 + 0.4) / 2]))
    assert float(parts.dissimilarity) == 0.0
    _, flagged = score(generator, likely, similarities, scoring, coverage)
    torch.testing.assert_close(flagged, torch.tensor([0.45 / 0.25]))  # raised to the reverse ratio: flagged
    _, normal = score(generator, likely, similarities, scoring, [torch.ones(1, 4), torch.ones(1, 2)])
    assert float(normal) < 1


@pytest.mark.parametrize("shape", [(1, 1, 224, 224), (2, 3, 20, 17), (1, 2, 5, 6)])
def test_the_separable_blur_equals_anomalibs_2d_gaussian_blur(shape: tuple[int, ...]) -> None:
    from anomalib.models.components import GaussianBlur2d

    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    # the full 33 x 33 kernel at sigma 4, replicate borders (also maps smaller than the kernel radius)
    full = GaussianBlur2d(kernel_size=(33, 33), sigma=(4.0, 4.0), channels=shape[1], border_type="replicate")
    torch.testing.assert_close(SeparableGaussianBlur(4.0)(maps), full(maps), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scoring", ["fused", "nearest", "paper"])
@pytest.mark.parametrize("averaging", [False, True])
def test_every_leave_one_out_reference_scores_at_most_one(scoring: str, averaging: bool) -> None:
    # no scoring needs a threshold of its own: each map is over its own leave-one-out maximum, then the boundary
    generator = AnomalyMapGenerator(num_levels=2, sigma=1.0, scoring=scoring)
    torch.manual_seed(0)
    references = [
        (
            [(torch.randn(1, 4, 4) * 3, torch.randn(1, 4, 4)) for _ in range(2)],  # log-likelihoods per level
            [torch.rand(1, 4, 4) for _ in range(2)],  # cosine similarities
            [torch.rand(1, 4, 4) * 5 for _ in range(2)],  # averaged Euclidean distances
        )
        for _ in range(3)
    ]

    def score_reference(index: int, constants: torch.Tensor) -> ScoreComponents:
        likelihoods, similarities, averaged = references[index]
        return generator.components(likelihoods, similarities, covered(similarities), (8, 8), constants, averaged)

    record_ = leave_one_out_scoring(score_reference, 3, 2, averaging=float(averaging))
    record_.dissimilarity_max = record_.reverse_dissimilarity_max = torch.tensor(100.0)  # the check out of the way
    scores = torch.cat(
        [score(generator, likelihoods, similarities, record_, None, averaged)[1]
         for likelihoods, similarities, averaged in references]
    )  # fmt: skip
    assert (scores <= 1 + 1e-6).all()  # no reference flagged
    # without defects the boundary is the floor over the worst reference's score
    assert float(scores.max()) == pytest.approx(1 / BOUNDARY_FLOOR, rel=1e-5)


def test_copies_of_one_image_cannot_set_a_threshold() -> None:
    from anomalib_resad import ResADModel

    model = ResADModel("resnet18", ["layer1", "layer2"], pre_trained=False, coupling_layers=2, pos_embed_dim=16).eval()
    image = torch.rand(1, 3, 64, 64)
    with pytest.raises(ResADInputError, match=r"4 reference images are \(near-\)identical"):
        model.make_reference_bank(image.repeat(4, 1, 1, 1))
    model.make_reference_bank(torch.cat([image, image.flip(-1), image.flip(-2), 1 - image]))  # different: accepted


def test_a_references_file_holding_nan_is_refused(tmp_path) -> None:
    from anomalib_resad.deploy import load_references, save_references
    from anomalib_resad.feature_converter import ReferenceBank
    from anomalib_resad.references import ReferenceSelection

    signature = {"backbone": "resnet18", "layers": ["layer1"], "image_size": [8, 8], "channels": [4], "grids": [[2, 2]]}
    bank = ReferenceBank([torch.rand(8, 4)], [(2, 2)], k=2, scoring=record(levels=1))
    selection = ReferenceSelection("widget", ["a.png", "b.png"])
    load_references(save_references(tmp_path / "fine.npz", bank, signature, selection))  # the file itself is valid
    bank.levels[0][3, 1] = float("nan")
    with pytest.raises(ResADInputError, match=r"damaged: reference_0 hold non-finite values"):
        load_references(save_references(tmp_path / "nan.npz", bank, signature, selection))
    bank.levels[0][3, 1] = 0.0
    bank.scoring.map_max = torch.tensor(float("nan"))
    with pytest.raises(ResADInputError, match=r"scoring map_max hold non-finite"):
        load_references(save_references(tmp_path / "nan_scoring.npz", bank, signature, selection))
