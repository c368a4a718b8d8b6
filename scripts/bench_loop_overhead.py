"""Per-step wall time of the training loop on the tiny model, for two source trees side by side.

    python scripts/bench_loop_overhead.py --trees /path/to/before /path/to/after --repeats 3

Runs `jaxrlhf sft` (tiny random model, the shipped SFT data, CPU) from each tree in
turn, A B A B ..., and reads the steady-state time per step from metrics.jsonl:
(time of the last step - time of step ``--skip``) / the steps in between, so
start-up and compilation are left out. At this size the step itself is a few
milliseconds, so what differs between two loops (host syncs, logging, fetching
the next batch) shows. Prints one line per run and the median per tree.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile


def _per_step_seconds(run_dir: pathlib.Path, skip: int) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    times = {r["step"]: r["time"] for r in rows if "loss" in r}
    last = max(times)
    return (times[last] - times[skip]) / (last - skip)


def _run(tree: pathlib.Path, base: pathlib.Path, run_dir: pathlib.Path, steps: int, batch: int, length: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "JAX_PLATFORMS": "cpu"}
    data = tree / "jaxrlhf" / "assets" / "sft.jsonl"
    command = [
        sys.executable, "-m", "jaxrlhf.cli", "sft", f"--run_dir={run_dir}", f"--model.path={base}",
        "--model.dtype=float32", f"--data.tokenizer={base}", f'--data.train=[{{"paths": ["{data}"]}}]',
        f"--data.max_length={length}", "--data.packing=first_fit", f"--data.batch_size={batch}",
        "--data.num_epochs=null",
        f"--max_steps={steps}", "--eval_at_start=false", "--export=false", "--checkpoint.save_every=0",
        "--logging.tensorboard=false", "--logging.progress_bar=false", "--optim.learning_rate=1e-3",
    ]  # fmt: skip
    # cwd outside every tree: `python -m` puts the working directory first on sys.path.
    subprocess.run(command, env=env, cwd=run_dir.parent, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", nargs="+", required=True, help="source trees (each holds jaxrlhf/)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--skip", type=int, default=50, help="steps left out at the start (compilation, warm-up)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_length", type=int, default=64)
    args = parser.parse_args()
    trees = [pathlib.Path(t).resolve() for t in args.trees]
    with tempfile.TemporaryDirectory() as tmp:
        base = pathlib.Path(tmp) / "base"
        env = {**os.environ, "PYTHONPATH": str(trees[-1]), "JAX_PLATFORMS": "cpu"}
        subprocess.run([sys.executable, "-m", "jaxrlhf.cli", "init-model", "--preset", "tiny", "--out", str(base)],
                       env=env, cwd=tmp, check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        results: dict[pathlib.Path, list[float]] = {t: [] for t in trees}
        for repeat in range(args.repeats):
            for i, tree in enumerate(trees):
                run_dir = pathlib.Path(tmp) / f"run-{repeat}-{i}"
                _run(tree, base, run_dir, args.steps, args.batch_size, args.max_length)
                seconds = _per_step_seconds(run_dir, args.skip)
                results[tree].append(seconds)
                print(f"repeat {repeat} {tree}: {seconds * 1e3:.2f} ms/step", flush=True)
    for tree, values in results.items():
        print(f"{tree}: median {statistics.median(values) * 1e3:.2f} ms/step over {len(values)} runs")


if __name__ == "__main__":
    main()
