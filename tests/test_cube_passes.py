"""cube_passes.py: which pixels go first, which neighbours' fits a pixel gets, and that the
second pass hands them to fit_spectrum with one refinement (and gives the maps of one pass
on a clean cube)."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cube_passes  # noqa: E402


def test_split_puts_even_pixels_and_pixels_without_an_even_neighbour_first():
    selected = np.ones((4, 5), bool)
    selected[3, 4] = False
    todo = [tuple(map(int, p)) for p in np.argwhere(selected)]
    first, second = cube_passes.split(selected, todo)
    assert first == [(y, x) for y, x in todo if y % 2 == 0 and x % 2 == 0]
    assert sorted(first + second) == sorted(todo) and not set(first) & set(second)
    lonely = np.zeros((5, 5), bool)
    lonely[1, 1] = lonely[3, 3] = lonely[4, 4] = True  # (3,3) and (4,4) touch (4,4), even
    first, second = cube_passes.split(lonely, [(1, 1), (3, 3), (4, 4)])
    assert first == [(1, 1), (4, 4)] and second == [(3, 3)]
    first, second = cube_passes.split(selected, [(1, 1)])  # done pixels still count as anchors
    assert first == [] and second == [(1, 1)]


def test_neighbour_fits_takes_fitted_finite_values_of_the_3x3_only():
    values = np.arange(6 * 5, dtype=float).reshape(6, 5)
    values[4, 2] = np.nan
    records = dict(y=np.array([0, 0, 2, 1, 1, 3]), x=np.array([0, 2, 0, 1, 2, 3]),
                   code=np.array([0, 6, 5, 0, 0, 0]), values=values)  # fmt: skip
    first = np.ones((4, 4), bool)
    fits = cube_passes.neighbour_fits(records, [(1, 0), (0, 1), (3, 0)], first)
    # (1,0): (0,0) fitted, (2,0) failed (code 5), (1,1) fitted; (0,1) adds (0,2) (code 6);
    # (1,2) has a NaN; (3,0) has no fitted neighbour and is left out
    assert set(fits) == {(1, 0), (0, 1)}
    assert np.array_equal(fits[(1, 0)], values[[0, 3]])
    assert np.array_equal(fits[(0, 1)], values[[0, 1, 3]])
    first[1, 1] = False  # a pass-2 pixel's record is never a start (resume = one run)
    fits = cube_passes.neighbour_fits(records, [(1, 0)], first)
    assert np.array_equal(fits[(1, 0)], values[[0]])


def test_second_pass_tasks_carry_neighbours_and_one_refinement():
    selected = np.ones((3, 3), bool)
    records = dict(y=np.array([0, 0]), x=np.array([0, 2]), code=np.array([0, 0]),
                   values=np.array([[1.0] * 5, [2.0] * 5]))  # fmt: skip
    S = dict(selected=selected, fit_kwargs=dict(method="nn+stack+slsqp", n_refine=2))
    later = [(0, 1, "starts01"), (2, 1, "starts21")]
    (batch,) = cube_passes.second_pass(S, later, records, size=4)
    assert batch[0][:3] == (0, 1, "starts01") and batch[0][3]["n_refine"] == 1
    assert np.array_equal(batch[0][3]["extra_starts"], records["values"])
    assert batch[1] == (2, 1, "starts21", None)  # no fitted neighbour: the full method
