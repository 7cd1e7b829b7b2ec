"""The reference Spectuner 2.0.0 as a peer in benchmarks (issue 10): its LTE model timed on the
same lines and channels, run by another Python (a venv with `pip install spectuner==2.0.0
"numpy<2.4"`) in a temporary folder. The reference's code is called, never copied.

    import bench_reference
    ms = bench_reference.reference_ms("refvenv/bin/python", freq_MHz, mol, params)
"""

from pathlib import Path

import numpy as np

REF_LTE = """
import sys, time, numpy as np
from spectuner.sl_model.sl_model import compute_effective_spectra, create_spectral_line_model_state
d = np.load(sys.argv[1])
freq = d["freq"]
inside = (d["line_freq"] >= freq[0]) & (d["line_freq"] <= freq[-1])
sl = {"freq": d["line_freq"][inside], "A_ul": d["A"][inside], "g_u": d["g_u"][inside],
      "E_low": d["E_low"][inside], "x_T": d["Q_T"], "Q_T": d["Q"],
      "segment": np.zeros(int(inside.sum()), dtype=int)}
beam_deg = float(d["beam_arcsec"]) / 3600
state = create_spectral_line_model_state([sl], [freq], [{"beam_info": (beam_deg, beam_deg),
                                          "T_bg": 0.0, "need_cmb": True}])
params = d["params"]
compute_effective_spectra(state, params[:1], need_individual=False)  # compile (numba)
best = np.inf
for _ in range(5):  # the best of 5 rounds, as _rate times this project
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.4:
        for p in params:
            compute_effective_spectra(state, p[None], need_individual=False)
            n += 1
    best = min(best, (time.perf_counter() - t0) / n)
print(f"{best * 1e3:.4f}")
"""


def reference_ms(ref_python: str, freq: np.ndarray, mol, params: np.ndarray) -> float:
    """ms per spectrum of the reference Spectuner 2.0.0's LTE model (run by ref_python, a
    Python with `pip install spectuner==2.0.0 "numpy<2.4"`) on the same lines and grid; its
    parameters are (theta, T_ex, N_tot, dv, v_off) with theta the source size [arcsec]."""
    import subprocess
    import tempfile

    beam = 0.5  # arcsec: eta = theta^2 / (theta^2 + beam^2)
    theta = beam * np.sqrt(params[:, 0] / (1 - params[:, 0]))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "lines.npz")
        np.savez(path, freq=freq, line_freq=mol.freq_MHz, A=mol.A_s, g_u=mol.g_u,
                 E_low=mol.E_low_K, Q_T=mol.Q_T_K, Q=10**mol.log10_Q, beam_arcsec=beam,
                 params=np.c_[theta, params[:, 1:]])  # fmt: skip
        out = subprocess.run(
            [ref_python, "-c", REF_LTE, path], capture_output=True, text=True, cwd=tmp
        )  # not here: this folder has a spectuner.py of its own
    if out.returncode:
        raise RuntimeError(f"reference run failed: {out.stderr.strip().splitlines()[-1:]}")
    return float(out.stdout.split()[-1])
