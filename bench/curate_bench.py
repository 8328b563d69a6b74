"""Curation benchmark: near-duplicate groups and diverse samples on 100k and 1M CLIP-like vectors.

    python bench/curate_bench.py                        # 100k and 1M x 512, writes docs/benchmarks.md
    python bench/curate_bench.py --n 20000 --no-write   # a quick look

Vectors: the search bench's generator (`EmbeddingLike`: clustered like CLIP image embeddings; a
vector's nearest other vector has cosine ~0.81 at 100k), plus planted near-duplicates: a share of
the vectors gets 1 to 3 copies at cosine 0.955-0.995 to it (what a re-encode, resize or small crop
does to a CLIP embedding), so the groups to find are known.

Each job runs in a fresh process that loads the matrix into memory (as the platform function holds
it) and reports its wall time and peak RSS; the machine's `uptime` is recorded before and after.
Baselines, in the same run:
- duplicates: all pairs in numpy blocks (X[block] @ X.T, pairs >= threshold, then connected
  components). At 1M it runs `--baseline-blocks` blocks and its time is extrapolated (the whole
  run would take hours); at 100k it runs whole, and its groups are the truth ours are compared with.
- diversity: the covering radius of uniform random samples of the same size (`--random-seeds`).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Near-duplicates and diverse samples (`bench/curate_bench.py`)"
THRESHOLD = 0.95


# ---- data -----------------------------------------------------------------------------------
def generate(n: int, dim: int, dup_share: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(vectors, planted group id per row or -1): n rows in all, near-duplicates included."""
    from search_bench import EmbeddingLike, _unit

    rng = np.random.default_rng(seed)
    originals = int(n * dup_share / 3)            # ~2 copies each on average
    copies = rng.integers(1, 4, originals)
    while originals + copies.sum() > n * dup_share * 1.5 and originals > 1:
        originals -= 1
        copies = copies[:originals]
    base_n = n - int(copies.sum())
    x = np.empty((n, dim), dtype=np.float32)
    x[:base_n] = EmbeddingLike(dim).sample(base_n, rng)
    planted = np.full(n, -1, dtype=np.int64)
    sources = rng.choice(base_n, originals, replace=False)
    row = base_n
    for group, (source, count) in enumerate(zip(sources, copies)):
        planted[source] = group
        for _ in range(count):
            cosine = rng.uniform(0.955, 0.995)
            noise = _unit(rng.standard_normal((1, dim)))[0] * np.sqrt(1 / cosine ** 2 - 1)
            x[row] = _unit((x[source] + noise)[None])[0]
            planted[row] = group
            row += 1
    order = rng.permutation(n)                    # copies are not next to their originals
    return np.ascontiguousarray(x[order]), planted[order]


# ---- jobs (each in its own process) ---------------------------------------------------------
def job(name: str, data: Path, out: Path, args: dict) -> dict:
    x = np.load(data)                             # in memory, as the platform function holds it
    loaded = time.perf_counter()
    result: dict = {}
    if name == "duplicates":
        from adapters.clip.duplicates import find_duplicate_groups
        found = find_duplicate_groups(x, args["threshold"])
        labels = np.full(len(x), -1, dtype=np.int64)
        for g, members in enumerate(found.groups):
            labels[members] = g
        np.save(out, labels)
        result = {"method": found.method, "groups": len(found.groups), "members": found.members,
                  "pairs": found.pairs, **found.stats}
    elif name == "baseline":
        result = all_pairs_baseline(x, args["threshold"], args.get("blocks"), out)
    elif name == "sample":
        from adapters.clip.sampling import diverse_sample
        sample = diverse_sample(x, args["picks"])
        result = {"radius": sample.radius, "picks": len(sample.picks)}
        np.save(out, sample.picks)
    elif name == "random":
        from adapters.clip.sampling import covering_radius
        radii = [covering_radius(x, np.random.default_rng(seed).choice(len(x), args["picks"], replace=False))
                 for seed in range(args["seeds"])]
        result = {"radii": radii}
    result["seconds"] = time.perf_counter() - loaded
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime      # the whole process, loading included
    result["peak_rss_gib"] = peak_rss_kib() / 2**20
    return result


def peak_rss_kib() -> int:
    """This process's own peak RSS (VmHWM). Not ru_maxrss: Linux carries the parent's peak into a
    child's ru_maxrss across fork and exec, so a job started by a parent that held the generated
    matrix would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def all_pairs_baseline(x: np.ndarray, threshold: float, blocks: int | None, out: Path, rows: int = 512) -> dict:
    """The naive way: every row block against the whole matrix, all pairs kept, components at the end."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(x)
    starts = list(range(0, n, rows))
    ran = starts if not blocks else starts[:blocks]
    a, b = [], []
    for start in ran:
        scores = x[start:start + rows] @ x.T
        i, j = np.nonzero(scores >= threshold)
        a.append(i + start)
        b.append(j)
    a, b = np.concatenate(a), np.concatenate(b)
    result = {"blocks_run": len(ran), "blocks_total": len(starts)}
    if len(ran) == len(starts):
        _, labels = connected_components(coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n)),
                                         directed=False)
        sizes = np.bincount(labels)
        labels[sizes[labels] < 2] = -1
        np.save(out, labels)
        result["groups"] = int(len(np.unique(labels[labels >= 0])))
    return result


def run_job(name: str, data: Path, work: Path, **args) -> dict:
    out = work / f"{name}-out.npy"
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import curate_bench as b; "
            f"print(json.dumps(b.job({name!r}, b.Path({str(data)!r}), b.Path({str(out)!r}), {args!r})))")
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - started
    result["out"] = str(out)
    say(f"  {name}: {result}")
    return result


# ---- comparisons ----------------------------------------------------------------------------
def same_partition(a: np.ndarray, b: np.ndarray) -> dict:
    """How far two groupings (label per row, -1 = none) agree: rows grouped by each, and whether the
    partitions are identical."""
    grouped_a, grouped_b = a >= 0, b >= 0
    pairs_a = {(int(x), int(y)) for x, y in zip(a[grouped_a & grouped_b], b[grouped_a & grouped_b])}
    identical = bool((grouped_a == grouped_b).all() and len(pairs_a) == len(np.unique(a[grouped_a]))
                     == len(np.unique(b[grouped_b])))
    return {"rows_grouped_truth": int(grouped_a.sum()), "rows_grouped_found": int(grouped_b.sum()),
            "rows_grouped_both": int((grouped_a & grouped_b).sum()), "identical": identical}


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(n: int, args: argparse.Namespace, work: Path) -> dict:
    say(f"n = {n:,}: {uptime()}")
    started = time.perf_counter()
    x, planted = generate(n, args.dim, args.dup_share)
    data = work / f"x-{n}.npy"
    np.save(data, x)
    del x
    r: dict = {"n": n, "generate_s": time.perf_counter() - started, "uptime_start": uptime(),
               "planted_groups": int(len(np.unique(planted[planted >= 0]))),
               "planted_rows": int((planted >= 0).sum())}
    r["duplicates"] = run_job("duplicates", data, work, threshold=THRESHOLD)
    found = np.load(r["duplicates"]["out"])
    r["vs_planted"] = same_partition(planted, found)
    blocks = None if n <= args.full_baseline_max else args.baseline_blocks
    r["baseline"] = run_job("baseline", data, work, threshold=THRESHOLD, blocks=blocks)
    b = r["baseline"]
    b["estimated_s"] = b["seconds"] * b["blocks_total"] / b["blocks_run"]
    if b["blocks_run"] == b["blocks_total"]:
        r["vs_baseline"] = same_partition(np.load(b["out"]), found)
    r["sample"] = run_job("sample", data, work, picks=args.picks)
    r["random"] = run_job("random", data, work, picks=args.picks, seeds=args.random_seeds)
    r["uptime_end"] = uptime()
    data.unlink()
    return r


# ---- report ---------------------------------------------------------------------------------
def report(results: list[dict], command: str, machine: str) -> str:
    lines = [SECTION, "",
             f"Command: `{command}`  ",
             f"Machine: {machine}, shared with other helpers' work (`uptime` per size below: the load average "
             f"was far above the 2 cores, so wall times are several times what the same job takes alone). Each job "
             f"is a fresh process that loads the float32 matrix into memory first; its peak RSS includes that "
             f"copy; its CPU time (user + system, the whole process) is what the job costs the machine.  ",
             "Data: the search bench's CLIP-like generator (a vector's nearest other vector has cosine ~0.81) "
             f"with planted near-duplicates: a share of vectors has 1-3 copies at cosine 0.955-0.995. "
             f"Threshold {THRESHOLD}.", ""]
    for r in results:
        d, b, s, rnd = r["duplicates"], r["baseline"], r["sample"], r["random"]
        lines += [f"**{r['n']:,} x 512** (uptime before: `{r['uptime_start']}`; after: `{r['uptime_end']}`)", "",
                  "| job | wall | CPU | peak RSS | result |", "|---|---:|---:|---:|---|"]
        vs = r.get("vs_baseline")
        truth = (f"same groups as the all-pairs baseline: **{'yes' if vs['identical'] else 'no'}** "
                 f"({vs['rows_grouped_both']:,} of {vs['rows_grouped_truth']:,} grouped rows in both)" if vs else
                 f"{r['vs_planted']['rows_grouped_both']:,} of the {r['vs_planted']['rows_grouped_truth']:,} planted "
                 f"rows grouped, same groups as planted: **{'yes' if r['vs_planted']['identical'] else 'no'}**")
        lines.append(f"| `find_duplicate_groups` ({d['method']}: {d.get('cells', '-')} cells, nprobe "
                     f"{d.get('nprobe', '-')}, {100 * d.get('compared_share', 1):.2f}% of all pairs scored) | "
                     f"**{d['seconds']:.0f} s** | {d.get('cpu_s', 0):.0f} s | **{d['peak_rss_gib']:.2f} GiB** | "
                     f"{d['groups']:,} groups, {d['members']:,} items; {truth}; planted: {r['planted_groups']:,} "
                     f"groups, {r['planted_rows']:,} items |")
        how = ("whole" if b["blocks_run"] == b["blocks_total"] else
               f"{b['blocks_run']} of {b['blocks_total']} blocks of 512 rows took {b['seconds']:.0f} s; extrapolated")
        cpu = b.get("cpu_s", 0) * (b["blocks_total"] / b["blocks_run"] if b["blocks_run"] else 1)
        lines.append(f"| baseline: all pairs in numpy blocks ({how}) | {b['estimated_s']:.0f} s "
                     f"= **{b['estimated_s'] / d['seconds']:.0f}x** ours | ~{cpu:.0f} s | {b['peak_rss_gib']:.2f} GiB | |")
        lines.append(f"| `diverse_sample`, {s['picks']:,} picks | **{s['seconds']:.0f} s** | {s.get('cpu_s', 0):.0f} s | "
                     f"{s['peak_rss_gib']:.2f} GiB | covering radius **{s['radius']:.3f}** (cosine distance) |")
        lines.append(f"| baseline: {s['picks']:,} uniform random picks, {len(rnd['radii'])} seeds | "
                     f"{rnd['seconds'] / len(rnd['radii']):.0f} s each (computing the radius) | | "
                     f"{rnd['peak_rss_gib']:.2f} GiB | radius {', '.join(f'{v:.3f}' for v in rnd['radii'])} |")
        lines.append("")
    return "\n".join(lines)


def write_section(text: str) -> None:
    doc = DOC.read_text(encoding="utf-8")
    if SECTION in doc:
        start = doc.index(SECTION)
        after = doc.find("\n## ", start + len(SECTION))
        end = len(doc) if after < 0 else after + 1
        doc = doc[:start] + text.rstrip() + "\n\n" + doc[end:].lstrip("\n")
    else:
        doc = doc.rstrip() + "\n\n" + text.rstrip() + "\n"
    DOC.write_text(doc, encoding="utf-8")


def main() -> None:
    from search_bench import machine

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--picks", type=int, default=1000)
    parser.add_argument("--random-seeds", type=int, default=2, help="random samples whose radius is measured")
    parser.add_argument("--dup-share", type=float, default=0.02, help="share of rows in planted groups")
    parser.add_argument("--full-baseline-max", type=int, default=200_000,
                        help="largest n whose all-pairs baseline runs whole")
    parser.add_argument("--baseline-blocks", type=int, default=8, help="blocks the baseline runs above that")
    parser.add_argument("--work", help="folder for the generated matrices (default: a temp folder)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--from-json", metavar="FILE", help="write the report of an earlier run's JSON output")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        text = report(results, results[0].get("command", "python bench/curate_bench.py"), machine())
        print(text)
        if not args.no_write:
            write_section(text)
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="curate-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [measure(n, args, work) for n in args.n]
    command = "python bench/curate_bench.py" + "".join(f" {a}" for a in sys.argv[1:])
    for r in results:
        r["command"] = command
    print(json.dumps(results, indent=2, default=float))
    text = report(results, command, machine())
    print(text)
    if not args.no_write:
        write_section(text)
        say(f"updated {DOC}")


if __name__ == "__main__":
    main()
