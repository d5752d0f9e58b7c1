"""Bundle size with several buckets vs one (issue 12): the weights are stored once, each bucket adds a table.

Builds the same model twice, once with one bucket and once with several, and prints the bytes of
each bundle and their ratio (the target: 3 buckets <= 1.05 x one). `--preset tiny` uses the seeded
tiny model; `--preset ltx2-video` the reduced-depth real-layout path of tests/engines/test_ltx2_reduced.py
(a full-width 1-layer DiT, the full video VAE, a 3840-wide 2-layer random Gemma-3; `synthetic.py`).

    .venv/bin/python benchmarks/bucket_size.py --preset tiny --work /tmp/bucket-size
    .venv/bin/python benchmarks/bucket_size.py --preset ltx2-video --work /tmp/bucket-size --json out.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from pathlib import Path

BUCKETS = {"tiny": ("9x96x64", "17x64x96", "9x64x64"), "ltx2-video": ("9x64x64", "17x96x64", "9x64x96")}


def bundle_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _synthetic(work: Path) -> tuple[Path, Path]:
    spec = importlib.util.spec_from_file_location("synthetic", Path(__file__).with_name("synthetic.py"))
    synthetic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(synthetic)
    return synthetic.write_all(work / "weights", dit_layers=1, gemma_layers=2)


def measure(preset: str, work: Path, keep: bool = False) -> dict:
    from stdrc.engines.cli import main as export_main

    buckets = BUCKETS[preset]
    weights: list[str] = []
    if preset == "ltx2-video":
        ckpt, gemma = _synthetic(work)
        weights = ["--checkpoint", str(ckpt), "--text-encoder", str(gemma)]
    sizes, seconds = {}, {}
    for name, flags in (("1", ["--bucket", buckets[0]]), (str(len(buckets)), [f for b in buckets
                                                                             for f in ("--bucket", b)])):
        out = work / f"{preset}-{name}-bucket"
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        code = export_main(["build-engines", "--preset", preset, *weights, *flags, "--backend", "onnxruntime",
                            "--out", str(out), "--cache-dir", str(work / "cache"), "-q"])
        if code != 0:
            raise SystemExit(f"build-engines exited {code}")
        seconds[name] = round(time.perf_counter() - start, 1)
        sizes[name] = bundle_bytes(out)
        if not keep:
            shutil.rmtree(out)
    many = str(len(buckets))
    return {"preset": preset, "buckets": list(buckets), "bytes": sizes, "ratio": sizes[many] / sizes["1"],
            "build_seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(BUCKETS), default="tiny")
    parser.add_argument("--work", type=Path, default=Path("/tmp/stdrc-bucket-size"))
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--keep", action="store_true", help="keep the bundles")
    args = parser.parse_args()
    result = measure(args.preset, args.work, args.keep)
    many = str(len(result["buckets"]))
    print(f"{args.preset}: 1 bucket {result['bytes']['1']:,} B, {many} buckets {result['bytes'][many]:,} B "
          f"-> {result['ratio']:.4f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
