"""Throughput of the independent verifier against a floor measured in the same run.

    .venv/bin/python benchmarks/bench_verify.py [--count N] [--workers W] [--script-type T]

Creates a temporary manifest (three random founders' keys, 2-of-3) and a JSON Lines export of
N addresses (generation is not timed), then measures, each in a fresh process:

* the floor: three BIP-32 child derivations (CKDpub with libsecp256k1) per address and
  nothing else, over the same (chain, index) pairs and with the same number of workers;
* the full verification: ``verify_export`` (read and parse the file, re-derive, build and
  compare script, address and script_pubkey, cross-set checks, report).

It prints addresses/s, seconds, CPU seconds, the ratio to the floor (wall clock and CPU) and
the peak RSS (self + children), with the load average seen, since other work on the machine
skews wall-clock numbers. With ``--repeat R`` both are run alternately R times; the best
(shortest) run of each is shown.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from coincurve import PrivateKey

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from custody.verify import load_manifest, verify_export  # noqa: E402
from custody.verify.base58 import b58check_encode  # noqa: E402
from custody.verify.bip32 import ChildDeriver, ckd_pub  # noqa: E402
from custody.verify.core import Checker, spec_of  # noqa: E402

CHUNK = 2000


def positions(count: int) -> list[tuple[int, int, int]]:
    """(chain, first index, last index + 1) ranges: 80 % receive, 20 % change addresses."""
    receive = count * 4 // 5
    out = []
    for chain, total in ((0, receive), (1, count - receive)):
        for start in range(0, total, CHUNK):
            out.append((chain, start, min(total, start + CHUNK)))
    return out


# -- generation (not timed) ------------------------------------------------------------------

_gen_checker: Checker | None = None


def _gen_init(manifest_path: str) -> None:
    global _gen_checker
    _gen_checker = Checker(spec_of(load_manifest(manifest_path)))


def _gen_chunk(job: tuple[int, int, int]) -> str:
    assert _gen_checker is not None
    chain, start, stop = job
    lines = []
    for index in range(start, stop):
        e = _gen_checker.expected(chain, index)
        lines.append(
            json.dumps(
                {
                    "chain": chain,
                    "index": index,
                    "account": f"user{index % 1000}",
                    "address": e.address,
                    "script_pubkey": e.script_pubkey.hex(),
                    "script": e.script.hex(),
                    "created_at": "2026-11-22T10:00:00Z",
                }
            )
        )
    return "\n".join(lines) + "\n"


def generate(directory: Path, count: int, script_type: str, workers: int) -> tuple[Path, Path]:
    founders = []
    for i in range(3):
        key = PrivateKey(os.urandom(32)).public_key.format()
        payload = (
            (bytes.fromhex("043587cf") + b"\x04" + os.urandom(4) + (0x80000002).to_bytes(4, "big"))
            + os.urandom(32)
            + key
        )
        founders.append({"name": f"founder-{i}", "xpub": b58check_encode(payload)})
    manifest = {
        "format": "custody-founders-manifest",
        "version": 1,
        "network": "regtest",
        "threshold": 2,
        "script_type": script_type,
        "founders": founders,
    }
    manifest_path = directory / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2))
    export_path = directory / "export.jsonl"
    header = {
        "format": "custody-address-export",
        "version": 1,
        "network": "regtest",
        "threshold": 2,
        "script_type": script_type,
        "descriptors": {},
        "exported_at": "2026-11-22T10:00:00Z",
    }
    with open(export_path, "w") as f, multiprocessing.Pool(workers, _gen_init, (str(manifest_path),)) as pool:
        f.write(json.dumps(header) + "\n")
        for text in pool.imap(_gen_chunk, positions(count)):
            f.write(text)
        f.write(json.dumps({"end": True, "count": count}) + "\n")
    return manifest_path, export_path


# -- the floor: 3 CKDpub per address, nothing else ----------------------------------------------

_floor_derivers: list[ChildDeriver] = []


def _floor_init(manifest_path: str) -> None:
    manifest = load_manifest(manifest_path)
    for chain in (0, 1):
        parents = [ckd_pub(f.key.key, f.key.chain_code, chain) for f in manifest.founders]
        _floor_derivers.append(ChildDeriver(parents))


def _floor_chunk(job: tuple[int, int, int]) -> int:
    """Three CKDpub per index (the verifier's own fastest libsecp256k1 path), nothing else."""
    chain, start, stop = job
    children = _floor_derivers[chain].children
    for index in range(start, stop):
        children(index)
    return stop - start


def run_floor(manifest_path: Path, count: int, workers: int) -> float:
    jobs = positions(count)
    start = time.perf_counter()
    with multiprocessing.Pool(workers, _floor_init, (str(manifest_path),)) as pool:
        done = sum(pool.imap_unordered(_floor_chunk, jobs))
    seconds = time.perf_counter() - start
    assert done == count
    return seconds


def run_verify(manifest_path: Path, export_path: Path, count: int, workers: int) -> float:
    start = time.perf_counter()
    manifest = load_manifest(manifest_path)
    report = verify_export(manifest, export_path, workers=workers)
    seconds = time.perf_counter() - start
    if not report.ok or report.checked != count:
        raise SystemExit(f"verification failed: {report.to_dict()['failures'][:5]}")
    return seconds


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def phase(args: argparse.Namespace) -> None:
    """Run one timed phase in this (fresh) process and print its result as JSON."""
    manifest_path, export_path = Path(args.manifest), Path(args.export)
    cpu = cpu_seconds()
    load = os.getloadavg()[0]
    if args.phase == "floor":
        seconds = run_floor(manifest_path, args.count, args.workers)
    else:
        seconds = run_verify(manifest_path, export_path, args.count, args.workers)
    result = {
        "seconds": seconds,
        "cpu": cpu_seconds() - cpu,
        "rss_mb": peak_rss_mb(),
        "load": max(load, os.getloadavg()[0]),
    }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--script-type", default="p2wsh", choices=["p2wsh", "p2sh-p2wsh", "p2sh"])
    parser.add_argument("--repeat", type=int, default=1, help="run floor and verify alternately R times; best")
    parser.add_argument("--phase", choices=["floor", "verify"], help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--export", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        phase(args)
        return

    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        t = time.perf_counter()
        manifest_path, export_path = generate(Path(tmp), args.count, args.script_type, args.workers)
        size = export_path.stat().st_size / 1e6
        print(
            f"generated {args.count:,} {args.script_type} addresses ({size:.0f} MB) "
            f"in {time.perf_counter() - t:.1f} s (not timed); workers={args.workers}"
        )
        results: dict[str, dict[str, float]] = {}
        for _ in range(args.repeat):
            for name in ("floor", "verify"):
                command = [sys.executable, __file__, "--phase", name, "--count", str(args.count)]
                command += ["--workers", str(args.workers), "--manifest", str(manifest_path)]
                command += ["--export", str(export_path)]
                out = subprocess.run(command, check=True, capture_output=True, text=True)
                result = json.loads(out.stdout.strip().splitlines()[-1])
                best = results.get(name)
                if best is None or result["seconds"] < best["seconds"]:
                    results[name] = result
    floor, full = results["floor"], results["verify"]
    print(f"{'':8}{'seconds':>10}{'addresses/s':>14}{'CPU s':>9}{'peak RSS MB':>14}{'load':>7}")
    for name, r in (("floor", floor), ("verify", full)):
        rate = args.count / r["seconds"]
        print(f"{name:8}{r['seconds']:10.2f}{rate:14,.0f}{r['cpu']:9.1f}{r['rss_mb']:14.0f}{r['load']:7.1f}")
    print(
        f"ratio verify/floor: {full['seconds'] / floor['seconds']:.3f} (wall), {full['cpu'] / floor['cpu']:.3f} (CPU)"
    )
    if max(floor["load"], full["load"]) > args.workers + 0.5:
        print(f"note: the 1-minute load average exceeded {args.workers}: other work shared the CPUs")


if __name__ == "__main__":
    main()
