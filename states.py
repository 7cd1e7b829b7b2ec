"""Training states of the policy (method §6): synthetic, line-forest and real spectra, each a
fitting problem (problem.Problem) plus the policy's tokens, and the processes that make them.
"method §N" is a section of docs/method.md.

A state is a function of its id, its kind (0 training, 1 evaluation of trained molecules, 2 of
held-out ones) and cfg.seed, so a replay buffer or a checkpoint keeps only ids. `cfg` is train.py's
Config (any object with its fields). state_server.StateServer makes them and evaluates their
losses in this process or in worker processes.

    ctx = states.build_context(cfg, mcfg)
    state = states.make_state(0, 0, ctx, cfg)  # tokens, n_peaks, u_true, loss_scale, problem
"""

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

import forest
import lte
import model
import spectuner

TRAIN_MOLECULES = (
    "CH3OH CH3CHO CH3CN CH3NC CH2CO HCOOH HCCNC HCCCHO Cyclopropenone Methoxy SO2 S-33-O2 "
    "S-34-O2 SOO-17 SOO-18 S-33-O S-34-O SO-18 OCS OC-13-S O-18-CS HDCO H2C-13-O H2CO-18 HC3N "
    "DC3N HC-13-CCN HCC-13-CN HCCC-13-N HCCCN-15 SiO Si-30-O SiO-18 CCH CCD C-13-CH CC-13-H "
    "C-13-N CN-15 DCN DNC HC-13-N HNC-13 HN-15-C N2D+ HCO-18+ CS+ CS-33 HC-13-S+ DCS+ HCS-34+"
).split()

REAL_HOLDOUT = ("85", "89", "105", "109")  # IRAS 16293-2422 B windows kept for evaluation
HOLDOUT = ("CH3OCHO", "CH3OCH3", "C2H3CN", "OCS-34")  # never trained on (nor in confusion)


LOSS_SCALE = {  # natural unit of each loss on a state: pm is in K, chi2 in units of sigma^2
    "pm": lambda fit: float(np.mean([np.mean(w.rms_K) for w in fit.windows])),
    "chi2": lambda fit: 1.0,
}


def log_uniform(rng, lo_hi) -> float:
    return float(10 ** rng.uniform(*np.log10(lo_hi)))


def load_molecules(names: list, cfg) -> dict:
    """{name: Molecule} restricted to the frequency range; entries that do not resolve are
    reported and skipped (the shared catalogue folder is optional), CH3OH is bundled."""
    out = {}
    catalog = cfg.catalog if cfg.catalog and Path(cfg.catalog).is_dir() else None
    for name in names:
        try:
            mol = lte.load_molecule(name, catalog if name != "CH3OH" else None)
        except ValueError as err:
            print(f"skip molecule={name} reason={str(err)[:80]!r}")
            continue
        mol = lte.select_lines(mol, cfg.freq_lo_MHz, cfg.freq_hi_MHz)
        if (mol.A_s > 0).sum() >= 1:
            out[name] = dataclasses.replace(mol, name=name)
    return out


def load_real(folder: str, v_lsr_kms: float, holdout=()) -> list:
    """Real windows (rest frame, method §3) from SPEC files and windows.csv, less the spw
    numbers in holdout (issue 12: they are evaluated, never trained on); [] if absent."""
    if not folder or not (Path(folder) / "windows.csv").exists():
        return []
    wins = []
    with open(Path(folder) / "windows.csv") as fh:
        for row in csv.DictReader(fh):
            if row["spw"] in set(map(str, holdout)):
                continue
            f, T = np.loadtxt(Path(folder) / f"spw{row['spw']}.dat", unpack=True)
            f = f * (1.0 + v_lsr_kms / lte.C_KMS)
            wins.append(spectuner.Window(f, T, float(row["rms_K"]), float(row["T_bg_K"]),
                                         float(row["beam_fwhm_arcsec"])))  # fmt: skip
    return wins


def synthetic_windows(rng, target, others: list, box: dict, cfg) -> tuple:
    """1..max_windows windows on the target's strong lines, target + others + noise (method §6).

    The target's parameters are uniform over the box, redrawn (up to 64 times) until its
    brightest channel exceeds 5 rms, except in a fraction p_absent of states, where it is
    either left out or kept at its first draw (often below the noise). Returns (windows, the
    target's true unit-cube parameters (5,) or None if left out).
    """
    T_rank = 10 ** rng.uniform(1.0, 2.5)  # which lines are strong depends on T_ex
    score = np.log10(target.A_s * target.g_u + 1e-300) - target.E_up_K / T_rank
    strong = np.argsort(-score)[:50]
    dv = log_uniform(rng, cfg.chan_kms)
    rms, beam = log_uniform(rng, cfg.rms_K), log_uniform(rng, (0.1, 30.0))
    T_bg = rng.uniform(0.0, cfg.T_bg_max) if rng.random() < 0.5 else 0.0
    grids = []
    for _ in range(int(rng.integers(1, cfg.max_windows + 1))):
        width = rng.uniform(*cfg.width_MHz)
        centre = target.freq_MHz[rng.choice(strong)] + rng.uniform(-0.4, 0.4) * width
        dnu = dv * centre / lte.C_KMS
        n = int(min(cfg.max_chan, max(16, width / dnu)))
        grids.append(centre + (np.arange(n) - n / 2) * dnu)
    absent = rng.random() < cfg.p_absent
    U = rng.random((64, 5))  # candidate target parameters
    T_target = [lte.spectrum(f, target, spectuner.to_physical(U, box), T_bg_K=T_bg) for f in grids]
    peak = np.max([np.abs(T).max(1) for T in T_target], axis=0)  # (64,)
    visible = np.flatnonzero(peak > 5 * rms)
    pick = 0 if absent else int(visible[0]) if visible.size else int(np.argmax(peak))
    keep_target = not (absent and rng.random() < 0.5)
    X = spectuner.to_physical(rng.random((len(others), 5)), box)  # one parameter set each
    wins = []
    for f, T_t in zip(grids, T_target):
        T = rng.normal(0.0, rms, f.size) + keep_target * T_t[pick]
        for mol, x in zip(others, X):
            T += lte.spectrum(f, mol, x[None], T_bg_K=T_bg)[0]
        wins.append(spectuner.Window(f, T, rms, T_bg, beam))
    return wins, U[pick] if keep_target else None


def make_state(sid: int, kind: int, ctx: dict, cfg) -> dict:
    """State number sid of a stream (kind 0 training, 1 eval trained, 2 eval held-out).

    A draw whose target has no line within reach of its windows (a window at the edge of the
    catalogue's range) is drawn again from the next seed, up to 8 times.
    """
    for attempt in range(8):
        try:
            return _draw_state(sid, kind, ctx, cfg, attempt)
        except ValueError as err:
            if "has no line within" not in str(err) or attempt == 7:
                raise


def _draw_state(sid: int, kind: int, ctx: dict, cfg, attempt: int) -> dict:
    """One draw of make_state; attempt 0 is the state's own seed."""
    seed = [cfg.seed, kind, sid] + ([attempt] if attempt else [])
    rng = np.random.default_rng(seed)
    targets = ctx["hold"] if kind == 2 else ctx["train"]
    real = kind != 2 and bool(ctx["real"]) and "CH3OH" in targets and rng.random() < cfg.real_frac
    if real:
        name = "CH3OH"
        pick = rng.choice(len(ctx["real"]), int(rng.integers(1, 4)), replace=False)
        wins, u_true = [ctx["real"][i] for i in sorted(pick)], ctx.get("real_u")
    elif ctx.get("forest") and rng.random() < cfg.forest_frac:
        return forest_state(sid, kind, rng, ctx, cfg)
    else:
        name = sorted(targets)[int(rng.integers(len(targets)))]
        pool = [m for m in sorted(ctx["train"]) if m != name]
        n_other = min(len(pool), int(rng.integers(0, cfg.max_others + 1)))
        others = [ctx["train"][pool[i]] for i in rng.choice(len(pool), n_other, replace=False)]
        wins, u_true = synthetic_windows(rng, targets[name], others, ctx["box"], cfg)
    return _state(sid, name, targets[name], wins, real, u_true, ctx, cfg)


def forest_state(sid: int, kind: int, rng, ctx: dict, cfg) -> dict:
    """A line-forest state (forest.py, issue 11): a hot corino or hot core of many molecules
    sharing one velocity field, in one to three windows of an ALMA band where the target has
    lines. Training states (kinds 0, 1) never hold a held-out molecule, as target or forest;
    held-out states (kind 2) have a held-out target in a forest of the other molecules."""
    mols = ctx["forest"] if kind != 2 else ctx["forest_all"]
    names = sorted(n for n in mols if forest.is_excluded(n, cfg.holdout) == (kind == 2))
    name = names[int(rng.integers(len(names)))]
    bands = [b for b, (lo, hi) in sorted(forest.BANDS_GHZ.items())
             if lte.select_lines(mols[name], 1e3 * lo, 1e3 * hi).A_s.size]  # fmt: skip
    exclude = () if kind == 2 else tuple(cfg.holdout)
    band, n_win = bands[int(rng.integers(len(bands)))], int(rng.integers(1, cfg.max_windows + 1))
    wins, truth = forest.draw_forest(rng, mols, name, cfg.forest_preset, band, n_win, exclude)
    u = spectuner.to_unit(truth["params"][name][None], ctx["box"])[0]
    u_true = u if np.all((u >= 0) & (u <= 1)) else None  # outside the box: no truth to imitate
    state = _state(sid, name, mols[name], [spectuner.Window(*w) for w in wins], False, u_true,
                   ctx, cfg)  # fmt: skip
    return state | dict(forest=sorted(truth["params"]))  # the molecules in its spectrum


def _state(sid, name, mol, wins, real, u_true, ctx, cfg) -> dict:
    """The state record: its fitting problem (its loss, method §4) and the policy's tokens."""
    fit = spectuner.Problem(wins, [mol], ctx["box"], cfg.loss)
    return dict(
        sid=sid, name=name, problem=fit, n_peaks=sum(c["obs"][2].size for c in fit.consts),
        real=real, u_true=u_true, loss_scale=LOSS_SCALE[cfg.loss](fit),
        tokens=model.make_tokens(fit.windows, spectuner.line_table(mol, ctx["mcfg"]), ctx["mcfg"]),
    )  # fmt: skip


def real_best(cfg, out_path: str, restarts: int = 3) -> dict:
    """The best-known CH3OH answer on the real training windows, written to out_path (JSON).

    Real states have no truth (issue 12): the best of `restarts` pso+slsqp searches (seeds 0..)
    on all real training windows together, at the pm optimum (no chi2 refinement), stands in
    for it. Every real state is a subset of these windows of one source, so this answer is in
    the right basin of each. Its unit-cube point joins a real state's set as the truth of a
    synthetic one does.
    """
    wins = load_real(cfg.real_dir, cfg.v_lsr, cfg.real_holdout)  # rest frame
    if not wins:
        raise ValueError(f"real_best: no real windows in {cfg.real_dir!r} (windows.csv)")
    mol = load_molecules(["CH3OH"], cfg)["CH3OH"]  # as the real states have it
    fits = [spectuner.fit_spectrum(wins, [mol], method="pso+slsqp", loss=cfg.loss, seed=seed,
                                   chi2_refine=False) for seed in range(restarts)]  # fmt: skip
    best = min(fits, key=lambda r: r["loss"])
    spws = sorted(set(_real_spws(cfg.real_dir)) - set(map(str, cfg.real_holdout)), key=int)
    out = dict(molecule="CH3OH", params=best["params"]["CH3OH"], loss=best["loss"],
               loss_name=cfg.loss, spw=spws, v_lsr_kms=cfg.v_lsr, restarts=restarts,
               losses=[r["loss"] for r in fits], nfev=sum(r["nfev"] for r in fits),
               command=f"python train.py real_best {out_path}")  # fmt: skip
    Path(out_path).write_text(json.dumps(out, indent=1) + "\n")
    print(f"real_best loss={best['loss']:.4g} params={best['params']['CH3OH']} -> {out_path}")
    return out


def _real_spws(folder: str) -> list:
    """spw numbers listed in folder/windows.csv."""
    with open(Path(folder) / "windows.csv") as fh:
        return [row["spw"] for row in csv.DictReader(fh)]


def load_real_best(cfg, box: dict):
    """Unit-cube point (5,) of cfg.real_best, or None (with the reason printed) if unusable."""
    path = Path(cfg.real_best) if cfg.real_best else None
    if path is None or not path.exists():
        print(f"skip=real_best reason='{cfg.real_best or 'none given'} is absent'")
        return None
    rec = json.loads(path.read_text())
    train_spws = sorted(set(_real_spws(cfg.real_dir)) - set(map(str, cfg.real_holdout)), key=int)
    if rec["spw"] != train_spws or rec["loss_name"] != cfg.loss:
        print(f"skip=real_best reason='{path} is for spw {rec['spw']} / {rec['loss_name']}, "
              f"training on {train_spws} / {cfg.loss}'")  # fmt: skip
        return None
    x = np.array([[rec["params"][p] for p in spectuner.PARAM_NAMES]])
    return spectuner.to_unit(x, box)[0]


def build_context(cfg, mcfg) -> dict:
    """What every state is drawn from: molecules (trained, held out, forest), the real windows
    and their known answer, the parameter box and the model configuration of the tokens.

    Raises:
        ValueError: if a molecule is both trained and held out, or no training molecule loads.
    """
    if set(cfg.molecules) & set(cfg.holdout):
        raise ValueError(
            f"molecules both trained and held out: {set(cfg.molecules) & set(cfg.holdout)}"
        )
    box = spectuner.make_box(["target"])
    real = load_real(cfg.real_dir, cfg.v_lsr, cfg.real_holdout)
    ctx = dict(train=load_molecules(cfg.molecules, cfg), hold=load_molecules(cfg.holdout, cfg),
               real=real, box=box, mcfg=mcfg)  # fmt: skip
    ctx["real_u"] = load_real_best(cfg, box) if real else None
    if not ctx["train"]:
        raise ValueError(f"none of the training molecules {cfg.molecules} could be loaded")
    if cfg.forest_frac > 0 and cfg.catalog and Path(cfg.catalog).is_dir():
        ctx["forest_all"] = forest.load_forest_molecules(cfg.catalog, quiet=True)
        ctx["forest"] = {n: m for n, m in ctx["forest_all"].items()
                         if not forest.is_excluded(n, cfg.holdout)}  # fmt: skip
    elif cfg.forest_frac > 0:
        print(f"skip=forest reason='catalogue folder {cfg.catalog} is absent'")
    print(f"molecules train={len(ctx['train'])} hold={len(ctx['hold'])} real={len(ctx['real'])}")
    return ctx
