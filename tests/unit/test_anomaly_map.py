# Copyright (C) 2026 anomalib-resad contributors
# SPDX-License-Identifier: Apache-2.0
"""Anomaly maps, image scores and the per-class leave-one-out calibration."""

import pytest
import torch

from anomalib_resad import ResADInputError
from anomalib_resad.anomaly_map import (
    AnomalyMapGenerator,
    ScoreCalibration,
    ScoreComponents,
    SeparableGaussianBlur,
    leave_one_out_calibration,
)


def level(log_normal: float, log_abnormal: float = -50.0, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((1, size, size), log_normal), torch.full((1, size, size), log_abnormal)


def components(
    generator: AnomalyMapGenerator,
    levels: list,
    constants: torch.Tensor,
    similarity: float = 1.0,
    similarities: list[torch.Tensor] | None = None,
):
    if similarities is None:
        similarities = [torch.full_like(log_normal, similarity) for log_normal, _ in levels]
    return generator.components(levels, similarities, (8, 8), constants)


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


def test_lower_likelihood_means_higher_score() -> None:
    generator = AnomalyMapGenerator(num_levels=2)
    likely = components(generator, [level(1.0, -3.0)] * 2, torch.ones(2))
    unlikely = components(generator, [level(-2.0, -1.0)] * 2, torch.ones(2))
    assert float(unlikely.score) > float(likely.score)


def test_top_mean_score_averages_the_highest_pixels() -> None:
    generator = AnomalyMapGenerator(num_levels=1, image_score="top_mean", top_fraction=0.25)
    log_normal = torch.zeros(1, 8, 8)
    log_normal[0, :2, :2] = -5.0  # one anomalous corner
    result = generator.components([(log_normal, torch.full_like(log_normal, -50.0))], [torch.ones(1, 8, 8)],
                                  (8, 8), torch.zeros(1))  # fmt: skip
    flat = result.anomaly_map.flatten()
    torch.testing.assert_close(result.score[0], flat.topk(16).values.mean())
    assert float(result.score) < float(result.map_max)


def test_dissimilarity_is_mean_one_minus_match_similarity() -> None:
    generator = AnomalyMapGenerator(num_levels=2)
    result = components(generator, [level(0.0), level(0.0)], torch.zeros(2), similarity=0.75)
    torch.testing.assert_close(result.dissimilarity, torch.tensor([0.25]))
    torch.testing.assert_close(result.level_max_log_likelihood, torch.zeros(1, 2))


def test_calibrated_output_is_in_units_of_the_class_threshold() -> None:
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0)
    raw = components(generator, [level(-1.0)], torch.zeros(1))
    calibration = ScoreCalibration(torch.zeros(1), 2.0, 4.0, 0.5, 1.0, 1.0).to_tensor()
    similarities = [torch.ones(1, 4, 4)]
    anomaly_map, score = generator([level(-1.0)], similarities, (8, 8), calibration)
    torch.testing.assert_close(anomaly_map, raw.anomaly_map / 2.0)
    torch.testing.assert_close(score, raw.score / 4.0)


def test_a_frame_unlike_the_references_scores_above_the_threshold_whatever_its_likelihood() -> None:
    generator = AnomalyMapGenerator(num_levels=1)
    calibration = ScoreCalibration(torch.zeros(1), 1.0, 1.0, 0.2, 1.0, 1.0).to_tensor()
    # a blank frame: the flow finds it perfectly likely, but its features match the references badly
    _, score = generator([level(10.0)], [torch.full((1, 4, 4), 0.5)], (8, 8), calibration)
    assert float(score) == pytest.approx(0.5 / 0.2)
    unchecked = AnomalyMapGenerator(num_levels=1, dissimilarity_check=False)
    _, score = unchecked([level(10.0)], [torch.full((1, 4, 4), 0.5)], (8, 8), calibration)
    assert float(score) < 1


def test_the_odd_frame_check_sets_labels_without_reordering_the_frames_it_passes() -> None:
    generator = AnomalyMapGenerator(num_levels=1)
    calibration = ScoreCalibration(torch.zeros(1), 1.0, 1.0, 0.2, 1.0, 1.0).to_tensor()
    likely, unlikely = level(10.0), level(-1.0)  # flow score 0 and > 0
    # below its threshold (0.19 / 0.2 < 1) the dissimilarity does not lift a score: the two keep their order
    _, quiet = generator([likely], [torch.full((1, 4, 4), 0.81)], (8, 8), calibration)
    _, scored = generator([unlikely], [torch.full((1, 4, 4), 0.99)], (8, 8), calibration)
    assert float(quiet) < 1 and float(quiet) < float(scored)
    # above it, the frame is flagged whatever its flow score
    _, odd = generator([likely], [torch.full((1, 4, 4), 0.7)], (8, 8), calibration)
    assert float(odd) == pytest.approx(0.3 / 0.2)


def test_scoring_without_calibration_is_a_clear_error() -> None:
    generator = AnomalyMapGenerator(num_levels=1)
    with pytest.raises(ResADInputError, match="no calibrated references"):
        generator([level(0.0)], [torch.ones(1, 4, 4)], (8, 8))


def test_global_constants_follow_training_by_ema() -> None:
    generator = AnomalyMapGenerator(num_levels=2, level_constants="global")
    generator.update_global_constant(1, torch.tensor([0.5, 2.0, 1.0]), momentum=0.9)
    torch.testing.assert_close(generator.global_level_constants, torch.tensor([0.0, 0.2]))
    calibration = ScoreCalibration(torch.tensor([7.0, 7.0]), 1.0, 1.0, 1.0, 1.0, 1.0).to_tensor()
    torch.testing.assert_close(generator.constants_for(calibration), torch.tensor([0.0, 0.2]))
    per_class = AnomalyMapGenerator(num_levels=2)
    torch.testing.assert_close(per_class.constants_for(calibration), torch.tensor([7.0, 7.0]))


def fake_scores(
    level_max: list[list[float]],
    values: list[float],
    dissimilarities: list[float],
    nearest: list[float] | None = None,
    reverse: list[float] | None = None,
):
    """A scorer of k references: image i has these level maxima, map/score value, dissimilarities, nearest score."""
    nearest = nearest or [0.0] * len(values)
    reverse = reverse or [0.0] * len(values)
    calls = []

    def score_reference(index: int, constants: torch.Tensor) -> ScoreComponents:
        calls.append((index, constants.clone()))
        value = torch.tensor([values[index] + float(constants.sum())])  # depends on the constants it is given
        return ScoreComponents(None, value, value, torch.tensor([dissimilarities[index]]),
                               torch.tensor([level_max[index]]), torch.tensor([nearest[index]]),
                               torch.tensor([reverse[index]]))  # fmt: skip

    return score_reference, calls


def test_leave_one_out_rule_constants_then_thresholds() -> None:
    score_reference, calls = fake_scores(
        [[1.0, -2.0], [3.0, -5.0], [2.0, -1.0]],
        [0.1, 0.3, 0.2],
        [0.05, 0.1, 0.2],
        nearest=[0.4, 0.6, 0.5],
        reverse=[0.3, 0.1, 0.2],
    )
    calibration = leave_one_out_calibration(
        score_reference, 3, 2, margin=1.5, dissimilarity_margin=2.0, reverse_dissimilarity_margin=3.0
    )
    torch.testing.assert_close(calibration.level_constants, torch.tensor([3.0, -1.0]))  # per-level max over refs
    # thresholds: margin x the largest value scored *with* those constants (sum 2.0 added by the fake scorer)
    assert calibration.map_threshold == pytest.approx(1.5 * 2.3)
    assert calibration.score_threshold == pytest.approx(1.5 * 2.3)
    assert calibration.dissimilarity_threshold == pytest.approx(2.0 * 0.2)
    assert calibration.nearest_threshold == pytest.approx(1.5 * 0.6)
    assert calibration.reverse_dissimilarity_threshold == pytest.approx(3.0 * 0.3)  # its own maximum and margin
    assert sorted({index for index, _ in calls}) == [0, 1, 2]  # every reference left out in turn


def test_leave_one_out_with_global_constants_and_k1() -> None:
    score_reference, _ = fake_scores([[9.0], [9.0]], [0.1, 0.3], [0.1, 0.1])
    calibration = leave_one_out_calibration(score_reference, 2, 1, global_constants=torch.tensor([0.5]))
    torch.testing.assert_close(calibration.level_constants, torch.tensor([0.5]))
    assert calibration.score_threshold == pytest.approx(0.8)
    with pytest.raises(ResADInputError, match="k >= 2"):
        leave_one_out_calibration(score_reference, 1, 1)


def test_calibration_round_trips_through_a_flat_tensor() -> None:
    calibration = ScoreCalibration(torch.tensor([1.0, -2.0, 3.0]), 0.5, 0.25, 0.125, 2.0, 4.0, 8.0, 1.0)
    values = calibration.to_tensor()
    assert values.tolist() == [1.0, -2.0, 3.0, 0.5, 0.25, 0.125, 2.0, 4.0, 8.0, 1.0]
    restored = ScoreCalibration.from_tensor(values)
    torch.testing.assert_close(restored.level_constants, calibration.level_constants)
    thresholds = (restored.map_threshold, restored.score_threshold, restored.dissimilarity_threshold)
    assert thresholds == (0.5, 0.25, 0.125) and restored.nearest_threshold == 2.0
    assert restored.reverse_dissimilarity_threshold == 4.0
    assert (restored.averaged_nearest_threshold, restored.averaging) == (8.0, 1.0)


def test_nearest_score_is_the_blurred_match_distance_of_the_two_deepest_levels() -> None:
    generator = AnomalyMapGenerator(num_levels=3, sigma=1.0)
    likelihoods = [level(0.0), level(0.0), level(0.0)]
    shallow_bad = [torch.zeros(1, 4, 4), torch.ones(1, 4, 4), torch.ones(1, 4, 4)]  # cos 0 at the shallowest level
    assert float(components(generator, likelihoods, torch.zeros(3), similarities=shallow_bad).nearest) == 0.0
    deep = [torch.ones(1, 4, 4), torch.full((1, 4, 4), 0.75), torch.full((1, 4, 4), 0.5)]
    # constant maps: 1 - cos summed over the two deepest levels, unchanged by upsampling and blurring
    nearest = components(generator, likelihoods, torch.zeros(3), similarities=deep).nearest
    torch.testing.assert_close(nearest, torch.tensor([0.75]))


def test_with_nearest_score_the_image_score_is_the_fused_maps_maximum() -> None:
    calibration = ScoreCalibration(torch.zeros(1), 1.0, 4.0, 10.0, 0.25, 1.0).to_tensor()
    similarities = [torch.full((1, 4, 4), 0.5)]  # nearest score 0.5 -> ratio 2
    flow_only = AnomalyMapGenerator(num_levels=1, sigma=1.0)
    fused = AnomalyMapGenerator(num_levels=1, sigma=1.0, nearest_score=True)
    raw = components(flow_only, [level(-1.0)], torch.zeros(1), similarities=similarities)
    _, flow_score = flow_only([level(-1.0)], similarities, (8, 8), calibration)
    fused_map, fused_score = fused([level(-1.0)], similarities, (8, 8), calibration)
    torch.testing.assert_close(flow_score, raw.score / 4.0)
    # constant maps: the fused map is the mean of the flows' map over its threshold (1) and the nearest ratio
    # everywhere; the flow *score*'s own threshold (4) is not used by the fused score
    torch.testing.assert_close(fused_score, (raw.map_max / 1.0 + 0.5 / 0.25) / 2)
    torch.testing.assert_close(fused_score, fused_map.flatten(start_dim=1).amax(dim=1))


def test_the_fused_score_rewards_flows_and_matching_agreeing_on_the_place() -> None:
    # the flows see one defect in the top-left corner; the matching sees one either there or in the far corner
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0, nearest_score=True, dissimilarity_check=False)
    calibration = ScoreCalibration(torch.zeros(1), 1.0, 1.0, 10.0, 1.0, 1.0).to_tensor()
    log_normal = torch.zeros(1, 8, 8)
    log_normal[0, 0, 0] = -20.0
    likelihoods = [(log_normal, torch.full((1, 8, 8), -50.0))]
    same, other = torch.ones(1, 8, 8), torch.ones(1, 8, 8)
    same[0, 0, 0], other[0, 7, 7] = 0.0, 0.0
    parts = generator.components(likelihoods, [other], (8, 8), torch.zeros(1))
    _, agreeing = generator(likelihoods, [same], (8, 8), calibration)
    _, apart = generator(likelihoods, [other], (8, 8), calibration)
    assert agreeing > apart
    assert apart < (parts.score + parts.nearest) / 2  # the mean of the two terms' own maxima would not tell them apart


def test_checkpoints_without_the_nearest_threshold_still_load() -> None:
    generator = AnomalyMapGenerator(num_levels=2)
    old = {**generator.state_dict(), "calibration": torch.tensor([1.0, 2.0, 0.5, 0.5, 0.5])}  # L + 3 values
    generator.load_state_dict(old)
    assert generator.calibration.tolist() == [1.0, 2.0, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert generator.has_calibration  # scores as before
    fused = AnomalyMapGenerator(num_levels=2, nearest_score=True)
    fused.load_state_dict(old)
    assert not fused.has_calibration  # needs its references set again: a clear error, not a division by zero


def test_a_deployment_of_the_previous_format_is_refused_with_the_command_that_remakes_it(tmp_path) -> None:
    import json

    from anomalib_resad.deploy import METADATA_FILE, ReferenceConditionedInferencer

    (tmp_path / METADATA_FILE).write_text(json.dumps({"format_version": 2}))
    with pytest.raises(ResADInputError, match=r"older anomalib-resad .*resad export --checkpoint"):
        ReferenceConditionedInferencer(tmp_path)


def test_files_of_a_newer_format_are_refused_naming_the_upgrade(tmp_path) -> None:
    import json

    import numpy as np

    from anomalib_resad.deploy import FORMAT_VERSION, METADATA_FILE, ReferenceConditionedInferencer, load_references

    (tmp_path / METADATA_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION + 1}))
    with pytest.raises(ResADInputError, match=r"newer anomalib-resad .*Upgrade"):
        ReferenceConditionedInferencer(tmp_path)
    metadata = {"format_version": FORMAT_VERSION + 1, "layers": ["a"], "k": 2, "channels": [4],
                "reference_grids": [[2, 2]], "views": [8]}  # fmt: skip
    path = tmp_path / "refs.npz"
    np.savez(path, metadata=np.array(json.dumps(metadata)), reference_0=np.zeros((64, 4), np.float32),
             calibration=np.zeros(8, np.float32))  # fmt: skip
    with pytest.raises(ResADInputError, match=r"newer anomalib-resad .*Upgrade"):
        load_references(path)
    np.savez(path, metadata=np.array(json.dumps({"format_version": FORMAT_VERSION + 1})))  # arrays named otherwise
    with pytest.raises(ResADInputError, match=r"newer anomalib-resad .*Upgrade"):
        load_references(path)


def test_checkpoints_without_the_reverse_threshold_load_with_that_check_off(caplog: pytest.LogCaptureFixture) -> None:
    generator = AnomalyMapGenerator(num_levels=1, sigma=1.0)
    old = {**generator.state_dict(), "calibration": torch.tensor([0.0, 1.0, 1.0, 0.2, 1.0])}  # L + 4 values
    with caplog.at_level("WARNING"):
        generator.load_state_dict(old)
    assert generator.calibration.tolist() == pytest.approx([0.0, 1.0, 1.0, 0.2, 1.0, 0.0, 0.0, 0.0])
    assert "reverse odd-frame check" in caplog.text and "set again" in caplog.text
    assert generator.has_calibration
    # no coverage at all: a reverse dissimilarity of 1 would be flagged at any calibrated threshold below 1
    covering_nothing = [torch.zeros(1, 16)]
    _, score = generator([level(0.0)], [torch.ones(1, 4, 4)], (8, 8), coverage=covering_nothing)
    assert float(score) < 1  # threshold 0 = not calibrated: that check is off, the score is the score


def test_the_reverse_dissimilarity_flags_a_frame_that_covers_little_of_the_references() -> None:
    """The case of a black frame against circuit-board references: every frame position matches the references'
    uniform background (forward dissimilarity 0), while the references' tracks find nothing like them in the frame."""
    generator = AnomalyMapGenerator(num_levels=2, sigma=1.0)
    calibration = ScoreCalibration(torch.zeros(2), 1.0, 1.0, 0.2, 1.0, 0.25).to_tensor()
    likely = [level(0.0), level(0.0)]
    similarities = [torch.ones(1, 4, 4), torch.ones(1, 2, 2)]  # forward: perfectly matched
    coverage = [torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 0.2]])]  # half, then 0.4 unmatched
    parts = generator.components(likely, similarities, (8, 8), torch.zeros(2), coverage)
    torch.testing.assert_close(parts.reverse_dissimilarity, torch.tensor([(0.5 + 0.4) / 2]))
    assert float(parts.dissimilarity) == 0.0
    _, score = generator(likely, similarities, (8, 8), calibration, coverage)
    torch.testing.assert_close(score, torch.tensor([0.45 / 0.25]))  # raised to the reverse ratio: flagged
    well_covered = [torch.ones(1, 4), torch.ones(1, 2)]
    _, normal = generator(likely, similarities, (8, 8), calibration, well_covered)
    assert float(normal) < 1
    unchecked = AnomalyMapGenerator(num_levels=2, sigma=1.0, dissimilarity_check=False)
    _, passed = unchecked(likely, similarities, (8, 8), calibration, coverage)
    assert float(passed) < 1


def test_a_calibration_of_another_length_is_refused() -> None:
    """A references file of the previous format read past its version check would shift every threshold by one."""
    generator = AnomalyMapGenerator(num_levels=2, sigma=1.0)
    old = torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0, 1.0])  # L + 4 values
    with pytest.raises(ResADInputError, match=r"6 values .* 2 level constants \+ 7 thresholds"):
        generator([level(0.0), level(0.0)], [torch.ones(1, 4, 4)] * 2, (8, 8), old)


@pytest.mark.parametrize("shape", [(1, 1, 224, 224), (2, 3, 20, 17), (1, 2, 5, 6)])
def test_the_separable_blur_equals_anomalibs_2d_gaussian_blur(shape: tuple[int, ...]) -> None:
    from anomalib.models.components import GaussianBlur2d

    maps = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    # what the generator used before: the full 33 x 33 kernel at sigma 4, replicate borders (also maps smaller
    # than the kernel radius)
    full = GaussianBlur2d(kernel_size=(33, 33), sigma=(4.0, 4.0), channels=shape[1], border_type="replicate")
    torch.testing.assert_close(SeparableGaussianBlur(4.0)(maps), full(maps), atol=1e-5, rtol=1e-5)
    if min(shape[-2:]) > 16:  # PatchCore's blur (reflect borders), as benchmarks/bench_checkpoints.py swaps it in
        reflect = GaussianBlur2d(kernel_size=(33, 33), sigma=(4.0, 4.0), channels=shape[1])
        separable = SeparableGaussianBlur(4.0, padding_mode="reflect")
        torch.testing.assert_close(separable(maps), reflect(maps), atol=1e-5, rtol=1e-5)


def test_checkpoints_with_anomalibs_2d_blur_kernel_load_strictly() -> None:
    generator = AnomalyMapGenerator(num_levels=1)
    assert "blur.kernel" not in generator.state_dict()  # derived from sigma, not saved
    old = {**generator.state_dict(), "blur.kernel": torch.ones(1, 1, 33, 33)}  # saved by earlier versions
    generator.load_state_dict(old, strict=True)
    assert generator.blur.kernel.shape == (33,)


@pytest.mark.parametrize("image_score", ["max", "top_mean"])
@pytest.mark.parametrize("averaging", ["off", "on"])
def test_every_leave_one_out_reference_scores_at_most_one_over_the_margin(image_score: str, averaging: str) -> None:
    # the fused score needs no threshold of its own: each term is over margin x its own leave-one-out maximum
    generator = AnomalyMapGenerator(num_levels=2, sigma=1.0, image_score=image_score, nearest_score=True)
    generator.dissimilarity_check = False
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
        return generator.components(likelihoods, similarities, (8, 8), constants, None, averaged)

    calibration = leave_one_out_calibration(score_reference, 3, 2, margin=1.25, nearest_averaging=averaging)
    scores = torch.cat(
        [generator(likelihoods, similarities, (8, 8), calibration.to_tensor(), None, averaged)[1]
         for likelihoods, similarities, averaged in references]
    )  # fmt: skip
    assert (scores <= 1 / 1.25 + 1e-6).all()
    if image_score == "max":
        assert scores.max() > 0.5  # not trivially small: the worst reference comes close to 1 / margin
