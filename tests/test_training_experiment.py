"""The experiment of docs/self_forcing_experiment.md, small (sftools.training.experiment.QUICK): the
causal few-step students' samples move toward the known teacher's law."""

from __future__ import annotations

import pytest

from sftools.training.experiment import QUICK, run_experiment


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    return run_experiment(QUICK, str(tmp_path_factory.mktemp("experiment")))


def within(result, student: str) -> float:
    n = result.settings.trained_blocks
    return sum(result.distances[student][:n]) / n


def test_every_student_and_the_floor_are_scored_on_every_block(result):
    assert set(result.distances) == {"base", "ode_init", "teacher_forcing", "self_forcing", "teacher samples"}
    assert all(len(d) == QUICK.eval_blocks for d in result.distances.values())
    # exact draws of the law are the floor no student goes below by much
    assert max(result.distances["teacher samples"]) < min(min(d) for k, d in result.distances.items()
                                                          if k != "teacher samples") + 0.5


def test_ode_regression_moves_the_causal_student_toward_the_teachers_law(result):
    assert within(result, "ode_init") < 0.9 * within(result, "base")


def test_self_forcing_keeps_the_student_closer_to_the_law_than_the_untrained_base(result):
    assert within(result, "self_forcing") < within(result, "base")
