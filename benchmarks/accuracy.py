"""Benchmark: RetrievalAccuracyCalculator vs PML's AccuracyCalculator.

Prints one Markdown table: wall time and memory of ours and PML's on the same
synthetic data, as ratios, plus the time of one query × reference matrix product
of that size. Every case runs in a fresh subprocess so that its memory is its own,
and repeats the call ``--repeats`` times there (median time reported). Memory is
reported three ways: the process's peak RSS (about 400 MiB of it is importing
torch, faiss and numpy), and the *working* memory, the peak RSS during a call
minus the RSS just before it (Linux ``/proc/self/clear_refs``), for the first call
(which includes the libraries' one-time set-up: thread pools, BLAS buffers) and
the largest of the later calls; on CUDA, the peak allocated.

    PYTHONPATH=. python3 benchmarks/accuracy.py            # CUB- and SOP-test scale
    PYTHONPATH=. python3 benchmarks/accuracy.py --quick    # small smoke test
    PYTHONPATH=. python3 benchmarks/accuracy.py --device cuda
    PYTHONPATH=. python3 benchmarks/accuracy.py --rounds 3   # on a shared machine

``--rounds`` runs ours, PML and the matmul in turn, each round in fresh processes,
and reports the median time and the median of the per-round ratios, so that a
shared machine's changing load falls on both alike.

On CPU PML runs with its default faiss-cpu k-nn; on CUDA with its torch
``CustomKNN`` (whole matrix and batched; the faster is reported). Both rank by
Euclidean distance and compute P@1, R-Precision and MAP@R with k="max_bin_count"
(``--k none``: PML's default ``k=None``, every reference ranked, and also MAP over the
whole list, which needs it).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
#: with ``--k none`` also MAP over the whole list, which reads every ranked reference (with
#: only METRICS our calculator stops at the largest class, whatever k; PML ranks everything)
WHOLE_LIST_METRICS = ("mean_average_precision",)


def metrics_for(k: str | None) -> tuple[str, ...]:
    """The metrics both calculators compute at depth ``k``."""
    return METRICS if k == "max_bin_count" else (*METRICS, *WHOLE_LIST_METRICS)


SCALES = {  # name: (N, D, classes); "query / reference": even rows query the odd rows
    "CUB-test": (5924, 512, 100),
    "CUB-test, query / reference": (5924, 512, 100),
    "SOP-test": (60502, 512, 11316),
    "SOP-test, query / reference": (60502, 512, 11316),
}
QUICK_SCALES = {
    "CUB-like (quick)": (2000, 64, 40),
    "CUB-like (quick), query / reference": (2000, 64, 40),
    "SOP-like (quick)": (6000, 64, 1200),
}
PML_CUDA_BATCH = 4096


def clustered(n: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered float32 embeddings and int64 labels, every class with at least two
    members (when ``n >= 2 classes``)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % classes).astype(np.int64)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    x = centres[labels] + 1.5 * rng.standard_normal((n, dim), dtype=np.float32)
    return x, labels


def make_data(n: int, dim: int, classes: int, folder: Path, seed: int = 0) -> None:
    """:func:`clustered` data saved as ``x.npy`` and ``y.npy`` in ``folder``."""
    x, labels = clustered(n, dim, classes, seed)
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", labels)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return float(line.split()[1])
    raise KeyError(field)


def _reset_peak_rss() -> float:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; returns it in MiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS") / 1024


def _split(x, y, separate: bool) -> tuple:
    """``(query, labels)`` or, when ``separate``, ``(q, ql, r, rl)`` (even / odd rows)."""
    if not separate:
        return x, y
    return tuple(t.contiguous() for t in (x[0::2], y[0::2], x[1::2], y[1::2]))


def run_case(
    case: str, folder: Path, device: str, repeats: int, separate: bool, k: str | None
) -> dict:
    """Run one case in this process; returns the median seconds, memory and metrics."""
    import torch

    x = torch.from_numpy(np.load(folder / "x.npy")).to(device)
    y = torch.from_numpy(np.load(folder / "y.npy")).to(device)
    import pytorch_metric_learning.utils.accuracy_calculator  # noqa: F401  (imports untimed)

    import pml_margins.evaluation  # noqa: F401

    (x[:256] @ x[:256].T).sum()  # start the BLAS threads before timing, in every case
    sync(device)
    metrics: dict = {}
    times, working_mb = [], []
    for _ in range(repeats):
        base_mb = _reset_peak_rss()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()  # imports and loading are not timed
        metrics = _call(case, _split(x, y, separate), device, k)
        sync(device)
        times.append(time.perf_counter() - start)
        working_mb.append(_status_kb("VmHWM") / 1024 - base_mb)
    seconds = statistics.median(times)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu_peak_mb = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else 0.0
    return {
        "seconds": seconds,
        "peak_rss_mb": peak_mb,
        "working_first_mb": working_mb[0],  # includes the libraries' one-time set-up
        # later calls only: none with --repeats 1 (NaN, printed n/a), not the first again
        "working_mb": max(working_mb[1:]) if len(working_mb) > 1 else math.nan,
        "gpu_peak_mb": gpu_peak_mb,
        **metrics,
    }


def _call(case: str, inputs: tuple, device: str, k: str | None = "max_bin_count") -> dict:
    import torch
    from pytorch_metric_learning.distances import LpDistance
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    from pml_margins.evaluation import RetrievalAccuracyCalculator

    if case == "ours":
        calc = RetrievalAccuracyCalculator(include=metrics_for(k), k=k)
        return calc.get_accuracy(*inputs)
    if case.startswith("ours-recall-"):  # ours-recall-1-10-100-1000: Recall@K only
        ks = tuple(int(v) for v in case.removeprefix("ours-recall-").split("-"))
        calc = RetrievalAccuracyCalculator(
            include=[f"recall_at_{v}" for v in ks], recall_ks=ks, k="max_bin_count"
        )
        return calc.get_accuracy(*inputs)
    if case.startswith("pml"):
        knn = None
        if case == "pml-custom":
            knn = CustomKNN(LpDistance(normalize_embeddings=False))
        elif case == "pml-custom-batched":
            knn = CustomKNN(LpDistance(normalize_embeddings=False), batch_size=PML_CUDA_BATCH)
        calc = AccuracyCalculator(
            include=metrics_for(k), k=k, device=torch.device(device), knn_func=knn
        )
        return calc.get_accuracy(*inputs)
    if case == "matmul":  # one Q × N product, in row blocks (SOP's would need 14.6 GB)
        query, reference = inputs[0], inputs[2] if len(inputs) > 2 else inputs[0]
        block = 4096
        for s in range(0, len(query), block):
            (query[s : s + block] @ reference.T).sum()
        return {}
    raise ValueError(f"unknown case {case!r}")


def scale_data(scales: dict, only: list[str] | None):
    """Yield ``(name, (n, dim, classes), folder, separate)``, the data written to a
    temporary folder that lives until the next item."""
    for name, size in scales.items():
        if only and name not in only:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            make_data(*size, Path(tmp))
            yield name, size, Path(tmp), "query / reference" in name


def spawn(
    case: str, folder: Path, device: str, repeats: int, separate: bool, k: str = "max_bin_count"
) -> dict:
    cmd = [sys.executable, __file__, "--case", case, "--data", str(folder), "--device", device]
    cmd += ["--repeats", str(repeats), "--k", k] + (["--separate"] if separate else [])
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def interleaved(cases: list[str], folder: Path, args: argparse.Namespace, separate: bool) -> list:
    """Each case's result over ``--rounds`` rounds that run the cases in turn (so that
    a shared machine's load falls on all of them alike): the median seconds, the
    largest memory figures, and per round the seconds (``round_seconds``)."""
    rounds = [
        [spawn(c, folder, args.device, args.repeats, separate, args.k) for c in cases]
        for _ in range(args.rounds)
    ]
    results = []
    for runs in zip(*rounds, strict=True):
        if any("error" in r for r in runs):
            results.append(next(r for r in runs if "error" in r))
            continue
        merged = {key: max(r[key] for r in runs) for key in runs[0]}
        merged.update({m: runs[0][m] for m in (*METRICS, *WHOLE_LIST_METRICS) if m in runs[0]})
        merged["round_seconds"] = [r["seconds"] for r in runs]
        merged["seconds"] = statistics.median(merged["round_seconds"])
        results.append(merged)
    return results


def _mb(value: float) -> str:
    """MiB for the table; ``n/a`` for a figure not measured (NaN)."""
    return "n/a" if math.isnan(value) else f"{value:,.0f}"


def _ratio(ours: float, pml: float) -> str:
    """ours / PML; ``n/a`` where either was not measured or PML's is 0 MiB (no ratio)."""
    return "n/a" if math.isnan(ours) or math.isnan(pml) or pml <= 0 else f"{ours / pml:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, for smoke tests")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--only", nargs="+", help="scale names to run")
    parser.add_argument("--repeats", type=int, default=3, help="calls per case (median time)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run ours, PML and matmul in turn this many times, each in a fresh process "
        "(median time; on a shared machine, also the median of the per-round ours/PML ratios)",
    )
    parser.add_argument(
        "--recall-ks",
        type=int,
        nargs="+",
        help="also time ours computing only Recall@these K (PML has no Recall@K)",
    )
    parser.add_argument(
        "--k",
        default="max_bin_count",
        choices=["max_bin_count", "none"],
        help='k-NN depth of both calculators ("none": PML\'s default k=None, whole lists)',
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--separate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        k = None if args.k == "none" else args.k
        result = run_case(args.case, Path(args.data), args.device, args.repeats, args.separate, k)
        print(json.dumps(result))
        return
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device here")

    scales = QUICK_SCALES if args.quick else SCALES
    cuda = args.device.startswith("cuda")
    pml_cases = ["pml-custom", "pml-custom-batched"] if cuda else ["pml"]
    mem = "peak GPU MiB" if cuda else "peak RSS MiB"
    rows = [
        f"| set | N × D, classes | PML s | ours s | time ours/PML | PML {mem} | ours {mem} "
        "| ours/PML | PML working MiB 1st/later | ours working MiB 1st/later | ours/PML later "
        "| matmul s | ours/matmul | max abs Δ metric |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)  # each row as its scale finishes: a cut-off run keeps them
    for name, (n, dim, classes), folder, separate in scale_data(scales, args.only):
        ours, *pmls, matmul = interleaved(["ours", *pml_cases, "matmul"], folder, args, separate)
        ok = [p for p in pmls if "error" in p] != pmls
        pml = min((p for p in pmls if "error" not in p), key=lambda p: p["seconds"]) if ok else {}
        if "error" in ours or not pml or "error" in matmul:
            print(f"| {name} | error: {ours.get('error') or pmls or matmul} |", flush=True)
            continue
        key = "gpu_peak_mb" if cuda else "peak_rss_mb"
        delta = max(abs(ours[m] - pml[m]) for m in metrics_for(args.k))
        pairs = zip(ours["round_seconds"], pml["round_seconds"], strict=True)
        ratio = statistics.median(o / p for o, p in pairs)  # per round: same load on both
        print(
            f"| {name} | {n:,} × {dim}, {classes:,} | {pml['seconds']:.2f} | "
            f"{ours['seconds']:.2f} | {ratio:.2f} | "
            f"{pml[key]:,.0f} | {ours[key]:,.0f} | {ours[key] / pml[key]:.2f} | "
            f"{pml['working_first_mb']:,.0f} / {_mb(pml['working_mb'])} | "
            f"{ours['working_first_mb']:,.0f} / {_mb(ours['working_mb'])} | "
            f"{_ratio(ours['working_mb'], pml['working_mb'])} | "
            f"{matmul['seconds']:.2f} | {ours['seconds'] / matmul['seconds']:.2f} | {delta:.1e} |",
            flush=True,
        )
    if args.recall_ks:
        print(recall_table(scales, args))


def recall_table(scales: dict, args: argparse.Namespace) -> str:
    """Ours alone computing Recall@K for large K (its k-nn needs k = max(K))."""
    case = "ours-recall-" + "-".join(str(v) for v in sorted(set(args.recall_ks)))
    rows = [
        "| set | Recall@K | ours s | ours working MiB 1st/later | Recall@K values |",
        "|---|---|---|---|---|",
    ]
    for name, _, folder, separate in scale_data(scales, args.only):
        got = spawn(case, folder, args.device, args.repeats, separate)
        if "error" in got:
            rows.append(f"| {name} | error: {got['error']} |")
            continue
        values = ", ".join(f"{got[f'recall_at_{v}']:.4f}" for v in sorted(set(args.recall_ks)))
        rows.append(
            f"| {name} | {', '.join(map(str, sorted(set(args.recall_ks))))} | "
            f"{got['seconds']:.2f} | {got['working_first_mb']:,.0f} / {_mb(got['working_mb'])} | "
            f"{values} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    main()
