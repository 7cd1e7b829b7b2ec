"""A cube in two passes (issue 10): a quarter of the pixels first, then the rest from their
fitted neighbours.

Neighbouring pixels of a map usually hold nearly the same lines, so a neighbour's optimum is a
start already in the right basin. Pass 1 fits the pixels of even row and even column (and any
pixel with no such neighbour selected) with the method as given. Pass 2 fits every other pixel
with the fits of its pass-1 neighbours (the 3 x 3 around it) among its starts and one
refinement instead of n_refine: where a neighbour's optimum is the best start, it is the one
refined (methods._refine_distinct takes turns between the sources). A pass-2 pixel none of
whose neighbours was fitted gets the full method. The result of a pixel depends only on the
cube, the options and its neighbours' records, so a resumed run (cube_store.py) gives the same
maps, with any number of workers. docs/benchmarks.md §4 has what it saves and what it costs.

    first, second = cube_passes.split(selected, todo)
    cube_passes.run_passes(S, todo, cfg, kind, out, log, progress)
"""

import numpy as np

from cube_run import plan_batches, run_pixels, task_size
from cube_store import load_chunks

FITTED = (0, 6)  # record codes with fitted values (6: the optimiser's status was not "ok")


def first_pass(selected: np.ndarray) -> np.ndarray:
    """(Y, X) bool: the pixels of pass 1, from the selection alone (so the same on --resume):
    even y and even x, or no such pixel selected in the 3 x 3 around it."""
    even = np.zeros(selected.shape, bool)
    even[::2, ::2] = True
    anchor = np.pad(selected & even, 1)
    near = np.zeros(selected.shape, bool)  # a selected even-even pixel in the 3 x 3
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            near |= anchor[dy : dy + selected.shape[0], dx : dx + selected.shape[1]]
    return even | ~near


def split(selected: np.ndarray, todo: list) -> tuple[list, list]:
    """The todo pixels [(y, x), ...] of pass 1 (first_pass) and of pass 2 (the others), each
    in the order of todo."""
    first = first_pass(selected)
    return [p for p in todo if first[p]], [p for p in todo if not first[p]]


def neighbour_fits(records: dict, pixels: list, first: np.ndarray) -> dict:
    """{(y, x): (m, 5 k) the finite fitted values of the pass-1 pixels (`first`, (Y, X) bool)
    among the 8 around it}, from cube_store.load_chunks records; pixels with none are left
    out. Pass-2 records are never used, so that the order of the fits does not matter."""
    y, x = records["y"].astype(int), records["x"].astype(int)
    ok = np.isin(records["code"], FITTED) & np.isfinite(records["values"]).all(axis=1)
    ok &= first[y, x]
    shape = first.shape
    where = np.full(shape, -1)
    where[y[ok], x[ok]] = np.flatnonzero(ok)
    out = {}
    for y, x in pixels:
        block = where[max(y - 1, 0) : y + 2, max(x - 1, 0) : x + 2]
        rows = block[block >= 0]
        if rows.size:
            out[(y, x)] = records["values"][rows]
    return out


def second_pass(S: dict, later: list, records: dict, size: int) -> list:
    """Batches of pass-2 tasks (y, x, network starts or None, fit options) of `size` each."""
    fits = neighbour_fits(records, [(t[0], t[1]) for t in later], first_pass(S["selected"]))
    override = dict(n_refine=1)
    tasks = [(y, x, rest[0] if rest else None,
              override | dict(extra_starts=fits[(y, x)]) if (y, x) in fits else None)
             for y, x, *rest in later]  # fmt: skip
    return [tasks[i : i + size] for i in range(0, len(tasks), size)]


def run_passes(S: dict, todo: list, cfg, kind: str, out, log, progress: dict) -> None:
    """Fit the todo pixels in two passes (one with cfg.neighbours False), writing the chunks
    (cube_run.run_pixels). The network's starts of the pass-2 pixels are drawn with pass 1's
    blocks (cube_run.with_network_starts) and kept until pass 2."""
    firsts = set(split(S["selected"], todo)[0] if cfg.neighbours else todo)
    later = []
    batches = plan_batches(S, todo, cfg.workers, cfg.method, cfg.policy)  # a missing policy
    # file raises here, before the first pixel

    def pass_one():
        for batch in batches:
            now = [t for t in batch if (t[0], t[1]) in firsts]
            later.extend(t for t in batch if (t[0], t[1]) not in firsts)
            if now:
                yield now

    run_pixels(S, pass_one(), cfg, kind, len(todo), out, log, progress)
    if later:
        log(f"pass 2: {len(later)} pixels, from the fits of their neighbours")
        size = task_size(len(todo), cfg.workers)
        batches = second_pass(S, later, load_chunks(out / "chunks"), size)
        run_pixels(S, batches, cfg, kind, len(todo), out, log, progress)
