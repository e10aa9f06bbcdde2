"""Peak resident memory of CPU inference with the default HDM (K=7), tiled vs untiled.

Each case runs in a fresh Python process and reports that process's peak RSS
(``ru_maxrss``), so one case's allocations cannot hide another's. Goal: a 4000x3000 photo
enhanced with the default tile size stays under 3 GiB; the untiled 1024x1024 peak is the
baseline measured in the same run.

    python bench/memory.py [--width 4000 --height 3000] [--tile 512] [--precision fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

_GIB = 1024**3


def run_case(width: int, height: int, tile: int | None, precision: str) -> dict[str, float]:
    """Child side: enhance one random image and report peak RSS and wall time."""
    import torch

    from hdm_model import enhance, hdm, prepare_for_inference

    torch.manual_seed(0)
    model = prepare_for_inference(hdm(), device="cpu")
    image = torch.rand(1, 3, height, width)
    idle_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    out = enhance(model, image, precision=precision, tile=tile)
    seconds = time.perf_counter() - start
    assert out.shape == image.shape
    peak_bytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_gib": peak_bytes / _GIB, "before_gib": idle_bytes / _GIB, "seconds": seconds}


def measure(width: int, height: int, tile: int | None, precision: str) -> dict[str, float]:
    """Parent side: one fresh interpreter per case."""
    command = [
        sys.executable, __file__, "--child",
        "--width", str(width), "--height", str(height),
        "--tile", str(tile or 0), "--precision", precision,
    ]
    result = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    from hdm_model.inference import DEFAULT_TILE

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--tile", type=int, default=DEFAULT_TILE, help="0 = untiled")
    parser.add_argument("--baseline-size", type=int, default=1024)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.width, args.height, args.tile or None, args.precision)))
        return

    cases = [
        (f"{args.baseline_size}x{args.baseline_size} untiled", args.baseline_size, args.baseline_size, None),
        (f"{args.width}x{args.height} tile {args.tile}", args.width, args.height, args.tile or None),
    ]
    print(f"HDM default (K=7), CPU, {args.precision}; peak RSS per case in a fresh process")
    header = f"{'case':>26} | {'peak RSS GiB':>12} | {'RSS before GiB':>14} | {'seconds':>8}"
    print(header)
    print("-" * len(header))
    results = []
    for label, width, height, tile in cases:
        result = measure(width, height, tile, args.precision)
        results.append(result)
        print(f"{label:>26} | {result['peak_gib']:>12.2f} | {result['before_gib']:>14.2f} | {result['seconds']:>8.1f}")
    ratio = results[1]["peak_gib"] / results[0]["peak_gib"]
    megapixels = args.width * args.height / args.baseline_size**2
    print(f"tiled peak / untiled peak: {ratio:.2f} for {megapixels:.1f}x the pixels (goal: tiled < 3 GiB)")


if __name__ == "__main__":
    main()
