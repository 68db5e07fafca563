"""The embedded model's report card: what the judge sees in images made from the evaluation prompts.

Runs the torch-free runtime on an exported model folder (the embedded one by default) over the fixed
`evaluation_prompts` (half trained colour-shape-background combinations, half held-out ones), one
seed per prompt, and reports the judge's accuracy per attribute and split, for each sampler asked.

    python -m sdonnx.models.evaluate --samplers euler,dpmpp_2m --prompts 200 --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from sdonnx.errors import InputError
from sdonnx.models.draw import evaluation_prompts
from sdonnx.models.judge import accuracy, judge
from sdonnx.runtime.cli import parse_interval, parse_lora
from sdonnx.runtime.pipeline import GenerationConfig, Pipeline
from sdonnx.runtime.sampling import SAMPLERS

# The runtime's defaults: the model is judged as a user gets it.
DEFAULTS = {f.name: f.default for f in fields(GenerationConfig) if f.name == "sampler"}


@dataclass(frozen=True)
class Score:
    """Judge accuracy per attribute on trained and on held-out combinations, and the time it took."""

    sampler: str
    steps: int
    guidance: float
    trained: dict[str, float]
    heldout: dict[str, float]
    seconds: float


def score(pipe, sampler: str, *, prompts: int = 200, steps: int | None = None, guidance: float | None = None,
          seed: int = 0, **settings) -> Score:
    """Generate one image per evaluation prompt (seed + i for prompt i) and judge them, split by split.

    settings: other GenerationConfig fields (guidance_interval, schedule, ...)."""
    resolved = GenerationConfig("", sampler=sampler, steps=steps, guidance=guidance)
    resolved = resolved.with_defaults(pipe.manifest.recommended)
    steps, guidance = resolved.steps, resolved.guidance  # the model's recommended settings when not given
    pairs = evaluation_prompts(prompts)
    started = time.monotonic()
    verdicts = [
        judge(pipe(prompt, sampler=sampler, steps=steps, guidance=guidance, seed=seed + i, **settings)[0])
        for i, (prompt, _) in enumerate(pairs)
    ]
    half = len(pairs) // 2
    scenes = [scene for _, scene in pairs]
    return Score(
        sampler=sampler,
        steps=steps,
        guidance=guidance,
        trained=accuracy(verdicts[:half], scenes[:half]),
        heldout=accuracy(verdicts[half:], scenes[half:]),
        seconds=round(time.monotonic() - started, 1),
    )


def markdown(scores: list[Score]) -> str:
    """One row per sampler: trained accuracy per attribute, then held-out object colour."""
    attributes = list(scores[0].trained)
    lines = [
        "| sampler | steps | " + " | ".join(attributes) + " | held-out colour | held-out shape |",
        "|---|---|" + "---|" * (len(attributes) + 2),
    ]
    for s in scores:
        cells = [f"{100 * s.trained[a]:.0f}%" for a in attributes]
        held = [f"{100 * s.heldout[a]:.0f}%" for a in ("colour", "shape")]
        lines.append(f"| {s.sampler} | {s.steps} | " + " | ".join(cells + held) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Score]:
    parser = argparse.ArgumentParser(prog="python -m sdonnx.models.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", type=Path, default=None, help="exported folder (default: embedded)")
    parser.add_argument("--samplers", default=DEFAULTS["sampler"], help="comma-separated sampler names")
    parser.add_argument("--prompts", type=int, default=200, help="even number: half trained, half held out")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-interval", metavar="LOW,HIGH", default=None, help="sigmas where CFG applies")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-interval", type=int, default=1,
                        help="feature caching (a folder exported with --feature-cache)")
    parser.add_argument("--lora", action="append", dest="lora_specs", metavar="FILE:WEIGHT",
                        help="apply this LoRA to every image (repeatable)")
    parser.add_argument("--out", type=Path, default=None, help="write the scores as JSON here")
    args = parser.parse_args(argv)
    samplers = args.samplers.split(",")
    for name in samplers:
        if name not in SAMPLERS:
            raise InputError("samplers", name, f"one of {sorted(SAMPLERS)}")
    options = {"threads": args.threads} if args.threads else {}
    pipe = Pipeline.load(args.model, progress=False, **options)
    settings = {"guidance_interval": parse_interval(args.guidance_interval)} if args.guidance_interval else {}
    if args.lora_specs:
        settings["loras"] = tuple(parse_lora(spec) for spec in args.lora_specs)
    if args.cache_interval != 1:
        settings["cache_interval"] = args.cache_interval
    scores = []
    for name in samplers:
        scores.append(score(pipe, name, prompts=args.prompts, steps=args.steps, guidance=args.guidance,
                            seed=args.seed, **settings))
        print(f"{name}: trained {scores[-1].trained} held-out {scores[-1].heldout} ({scores[-1].seconds} s)",
              file=sys.stderr)
    print(markdown(scores))
    if args.out:
        args.out.write_text(json.dumps([s.__dict__ for s in scores], indent=2) + "\n")
    return scores


if __name__ == "__main__":
    main()
