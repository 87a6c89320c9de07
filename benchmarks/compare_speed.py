#!/usr/bin/env python3
"""Time verifier.analysis.compare.compare_images against cmp and sum -r on page-cache-hot images.

For each size: writes two identical random images (and, with --diff, a copy with scattered
differences; with --worst, an image differing on every page), reads them once to warm the
page cache, then takes the best of --repeat runs of

  cmp A B                    (stops at the first difference; byte-exact baseline)
  sum -r A B                 (reads both files, like the comparator does)
  compare_images(A, B)       (in-process wall time)

Exit status 1 when compare_images on identical images is slower than --max-ratio x cmp.

    python benchmarks/compare_speed.py --sizes 256M,2G [--diff] [--worst] [--dir DIR]
"""

from __future__ import annotations

import argparse
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from verifier.analysis.compare import compare_images  # noqa: E402

BLOCK = 16 << 20
PAGE = 4096


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    num = text[:-1] if text[-1:] in "KMG" else text
    try:
        value = int(num) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 256M, 2G)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def human(n: int) -> str:
    for unit, m in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n % m == 0:
            return f"{n // m}{unit}"
    return str(n)


def write_pair(a: Path, b: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(a, "wb") as fa, open(b, "wb") as fb:
        left = size
        while left:
            n = min(BLOCK, left)
            data = rnd.randbytes(n)
            fa.write(data)
            fb.write(data)
            left -= n


def write_random(path: Path, size: int, seed: int) -> None:
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(BLOCK, left)
            f.write(rnd.randbytes(n))
            left -= n


def scatter_differences(src: Path, dst: Path, seed: int) -> int:
    """Copy src to dst and flip one byte in ~1 page of 997 plus a 1 MiB run; returns the
    number of differing pages."""
    shutil.copyfile(src, dst)
    size = src.stat().st_size
    pages = size // PAGE
    rnd = random.Random(seed)
    touched = set(range(0, pages, 997))
    run_start = pages // 2
    touched.update(range(run_start, min(pages, run_start + (1 << 20) // PAGE)))
    with open(dst, "r+b") as f:
        for p in sorted(touched):
            off = p * PAGE + rnd.randrange(PAGE)
            f.seek(off)
            byte = f.read(1)
            f.seek(off)
            f.write(bytes([byte[0] ^ 0x5A]))
    return len(touched)


def warm(*paths: Path) -> None:
    buf = bytearray(BLOCK)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run_tool(argv: list[str], ok=(0,)) -> None:
    res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if res.returncode not in ok:
        raise SystemExit(f"{argv[0]} failed ({res.returncode}): {res.stderr.decode().strip()}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="256M,2G", help="comma-separated image sizes (256M,2G)")
    ap.add_argument("--dir", type=Path, help="where to create the images (default: a temporary "
                    "directory under the current directory, removed afterwards)")
    ap.add_argument("--repeat", type=int, default=3, help="best of N runs (default 3)")
    ap.add_argument("--max-ratio", type=float, default=1.5,
                    help="fail when compare_images / cmp exceeds this on identical images")
    ap.add_argument("--diff", action="store_true", help="also time scattered differences")
    ap.add_argument("--worst", action="store_true", help="also time every page differing")
    args = ap.parse_args()
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    for tool in ("cmp", "sum"):
        if shutil.which(tool) is None:
            ap.error(f"{tool} not found in PATH")

    if args.dir:
        args.dir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="compare-speed-", dir=args.dir))
    else:
        workdir = Path(tempfile.mkdtemp(prefix="compare-speed-", dir=Path.cwd()))
    rows = []
    failed = False
    try:
        for size in sizes:
            a, b = workdir / "a.img", workdir / "b.img"
            write_pair(a, b, size, seed=size)
            warm(a, b)
            t_cmp = best_of(args.repeat, lambda: run_tool(["cmp", str(a), str(b)]))
            t_sum = best_of(args.repeat, lambda: run_tool(["sum", "-r", str(a), str(b)]))
            results = []
            t_py = best_of(args.repeat, lambda: results.append(compare_images(a, b)))
            assert results[-1].identical
            ratio = t_py / t_cmp
            failed |= ratio > args.max_ratio
            rows.append((human(size), "identical", t_cmp, t_sum, t_py, 0))
            if args.diff:
                c = workdir / "c.img"
                want = scatter_differences(a, c, seed=size + 1)
                warm(c)
                t_cmp_d = best_of(args.repeat, lambda: run_tool(["cmp", str(a), str(c)], ok=(1,)))
                results.clear()
                t_py_d = best_of(args.repeat, lambda: results.append(compare_images(a, c)))
                assert results[-1].diff_count == want, (results[-1].diff_count, want)
                rows.append((human(size), "scattered", t_cmp_d, None, t_py_d, want))
                c.unlink()
            if args.worst:
                c = workdir / "c.img"
                write_random(c, size, seed=size + 2)
                warm(c)
                results.clear()
                t_py_w = best_of(args.repeat, lambda: results.append(compare_images(a, c)))
                rows.append((human(size), "all differ", None, None, t_py_w,
                             results[-1].diff_count))
                c.unlink()
            a.unlink()
            b.unlink()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"best of {args.repeat}, page cache hot; cmp on differing images stops at the first "
          f"difference; sum -r reads both files")
    print(f"{'size':>6} {'images':<11} {'cmp s':>8} {'sum -r s':>9} {'compare s':>10} "
          f"{'x cmp':>7} {'x sum':>7} {'diff pages':>11}")
    for size, kind, tc, ts, tp, nd in rows:
        f = lambda v: f"{v:8.3f}" if v is not None else f"{'-':>8}"
        rc = f"{tp / tc:7.2f}" if tc else f"{'-':>7}"
        rs = f"{tp / ts:7.2f}" if ts else f"{'-':>7}"
        print(f"{size:>6} {kind:<11} {f(tc)} {f(ts):>9} {tp:10.3f} {rc} {rs} {nd:11d}")
    if failed:
        print(f"FAIL: compare_images slower than {args.max_ratio}x cmp on identical images",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
