"""The experiment of docs/self_forcing_experiment.md at the size of one seed's row there (sixty-four
evaluation videos of eight blocks): the causal few-step students move toward the known teacher's
law, and the Self Forcing student accumulates less error than the teacher-forcing one over blocks
beyond the length both were trained on."""

from __future__ import annotations

import pytest

from sftools.training.experiment import ExperimentSettings, run_experiment

SETTINGS = ExperimentSettings()  # seed 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_experiment(SETTINGS, str(tmp_path_factory.mktemp("experiment")))


def test_every_student_and_the_floor_are_scored_on_every_block(result):
    assert set(result.distances) == {"base", "ode_init", "teacher_forcing", "self_forcing", "teacher samples"}
    assert all(len(d) == SETTINGS.eval_blocks for d in result.distances.values())
    # exact draws of the law are the floor no student goes below by much
    assert max(result.distances["teacher samples"]) < min(min(d) for k, d in result.distances.items()
                                                          if k != "teacher samples") + 0.5


def test_ode_regression_moves_the_causal_student_toward_the_teachers_law(result):
    assert result.within("ode_init") < 0.9 * result.within("base")


def test_self_forcing_moves_the_student_closer_to_the_law_than_its_ode_init_within_the_trained_length(result):
    assert result.within("self_forcing") < result.within("ode_init")


def test_self_forcing_accumulates_less_error_than_teacher_forcing_beyond_the_trained_length(result):
    # Seed 0: 3.80 against 5.94 on two threads, 4.13 against 6.74 on one (training is chaotic, so float
    # order matters). docs/self_forcing_experiment.md gives every seed's figures: one in four ties.
    assert result.beyond("self_forcing") < 0.85 * result.beyond("teacher_forcing")
    assert result.drift("self_forcing") < result.drift("teacher_forcing")
