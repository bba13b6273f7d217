"""``make gpu-check``: what a CUDA machine has to confirm, in one run, written as JSON and Markdown.

1. Every plugin on a tiny model of every family in bfloat16 on the GPU: its do-nothing setting is
   bit-exact, every setting it benchmarks runs, and dropping tokens matches the masked dense
   reference within the kernels' noise (:mod:`vtoken.bench.exactness`).
2. Speed on a random-weight model of LLaVA-1.5-7B's real shape (32 x 4096 language model, CLIP
   ViT-L/14-336, 576 visual tokens) in bfloat16: prefill and decode-step time, time to first token
   and peak memory of every benchmark setting against the unplugged model (:mod:`vtoken.bench.speed`).
3. Kernels: after pruning, the decoder's SDPA calls still get no materialised mask and a fused
   kernel runs (:mod:`vtoken.bench.kernels`).

Run ``python -m vtoken.bench.gpu_check`` (``--quick``: two families, a tiny speed model and one
setting, a smoke run; ``--device cpu`` runs it on the CPU). It exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

from vtoken.bench.exactness import FamilyCheck, OracleCheck, check_oracle, check_plugins
from vtoken.bench.kernels import KernelCheck, check_kernels
from vtoken.bench.shapes import LLAVA_7B, QUICK, SpeedShape
from vtoken.bench.speed import SpeedResult, build_on, speed_device, time_plugins
from vtoken.errors import VTokenError
from vtoken.loading import DTYPES, resolve_device
from vtoken.metrics import NOT_MEASURED
from vtoken.registry import BUILTIN_PLUGINS, get_plugin_class
from vtoken.tiny import TINY_FAMILIES

#: ``--quick``: two families (1-D RoPE and M-RoPE) and a speed model of a few layers, seconds on a CPU.
QUICK_FAMILIES = ("llava", "qwen2_vl")
TINY_SPEED = replace(QUICK, hidden=128, layers=4, intermediate=256, vocab=1000, new_tokens=4)


@dataclass
class GpuCheck:
    """Everything one run measured, and where."""

    machine: str
    dtype: str
    plugins: list[FamilyCheck]
    oracle: list[OracleCheck]
    speed_shape: SpeedShape
    speed: dict[str, SpeedResult]
    kernels: list[KernelCheck]

    @property
    def passed(self) -> bool:
        checks = [*self.plugins, *self.oracle, *self.kernels]
        return all(c.passed for c in checks) and bool(self.speed)

    def to_dict(self) -> dict:
        return {**asdict(self), "passed": self.passed}


def run_gpu_check(
    device: str = "cuda", dtype: str = "bfloat16", quick: bool = False, repeats: int = 5
) -> GpuCheck:
    """All three parts on ``device`` in ``dtype`` (see the module docstring)."""
    device = speed_device(resolve_device(device))
    plugins, families = list(BUILTIN_PLUGINS), list(QUICK_FAMILIES if quick else TINY_FAMILIES)
    exact = check_plugins(plugins, families, device, dtype)
    oracle = check_oracle(families, device, dtype)
    shape = TINY_SPEED if quick else LLAVA_7B
    model, inputs = build_on(shape, device, dtype)
    settings = {
        f"{name}:{label}": get_plugin_class(name)(config)
        for name in plugins
        for label, config in get_plugin_class(name).bench_settings().items()
    }
    if quick:
        settings = dict(list(settings.items())[:1])
    speed = time_plugins(model, inputs, settings, shape, repeats=1 if quick else repeats)
    kernels = [check_kernels(model, inputs, [], "baseline")]
    kernels += [check_kernels(model, inputs, settings[label], label) for label in speed]
    return GpuCheck(_machine(device), dtype, exact, oracle, shape, speed, kernels)


def _machine(device: str) -> str:
    from vtoken.bench.provenance import machine

    return f"{machine(device)}, transformers {version('transformers')}"


def markdown(check: GpuCheck, command: str) -> str:
    """The report: one table per part, each row with its verdict."""
    lines = [
        f"`{command}`: {check.dtype}; {check.machine}. Overall: {_verdict(check.passed)}.",
        "",
        "| plugin | family | do-nothing bit-exact | bench settings | verdict |",
        "|---|---|---|---|---|",
    ]
    for c in check.plugins:
        outcomes = Counter(s.split(":")[0] for s in c.settings.values())  # ok, skipped, failed
        ran = ", ".join(f"{n} {outcome}" for outcome, n in sorted(outcomes.items()))
        exact = "n/a" if c.do_nothing_exact is None else str(c.do_nothing_exact).lower()
        lines.append(f"| {c.plugin} | {c.family} | {exact} | {ran} | {_verdict(c.passed)} |")
    lines += ["", "| family | batch | max logit error vs masked reference | noise floor (sdpa vs eager) "
              "| greedy tokens equal | verdict |", "|---|---|---|---|---|---|"]  # fmt: skip
    for o in check.oracle:
        lines.append(
            f"| {o.family} | {o.batch} | {o.error:.3g} | {o.floor:.3g} | {str(o.tokens_equal).lower()} "
            f"| {_verdict(o.passed)} |"
        )
    lines += ["", _speed_title(check.speed_shape), "", *_speed_table(check.speed), "", *_kernel_table(check)]
    return "\n".join(lines) + "\n"


def _speed_title(shape: SpeedShape) -> str:
    return (
        f"Speed: random-weight LLaVA, {shape.layers} x {shape.hidden} language model, {shape.visual_tokens} "
        f"visual tokens + {shape.text_tokens} text tokens, {shape.new_tokens} new tokens; medians of "
        "interleaved repetitions."
    )


def _speed_table(speed: dict[str, SpeedResult]) -> list[str]:
    rows = [
        "| setting | prefill ms (base / plugged) | prefill ratio (FLOPs) | decode ms/step (base / plugged) "
        "| decode ratio | first token ms (base / plugged) | peak MiB (base / plugged) |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in speed.items():
        ms = lambda d: f"{d['baseline'] * 1e3:.1f} / {d['plugged'] * 1e3:.1f}"  # noqa: E731
        peak = " / ".join(NOT_MEASURED if v is None else f"{v:.0f}" for v in r.peak_memory_mib.values())
        rows.append(
            f"| {label} | {ms(r.prefill_s)} | {r.prefill_ratio:.3f} ({r.prefill_flops_ratio:.3f}) "
            f"| {ms(r.decode_step_s)} | {r.decode_step_ratio:.3f} | {ms(r.first_token_s)} | {peak} |"
        )
    return rows


def _kernel_table(check: GpuCheck) -> list[str]:
    rows = [
        "Kernels of one unpadded prefill (all SDPA calls, vision tower included):",
        "",
        "| setting | decoder calls without a mask | causal | kernels | fused backends only | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for k in check.kernels:
        kernels = ", ".join(f"{name} x{n}" for name, n in k.kernels.items()) or "-"
        fused = "n/a (not CUDA)" if k.fused_only is None else str(k.fused_only).lower()
        calls = k.decoder_calls
        rows.append(
            f"| {k.label} | {calls - k.masked_calls}/{calls} | {k.causal_calls}/{calls} | {kernels} "
            f"| {fused} | {_verdict(k.passed)} |"
        )
    return rows


def _verdict(passed: bool) -> str:
    return "pass" if passed else "FAIL"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vtoken.bench.gpu_check", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:<index> or cpu (default: cuda)")
    parser.add_argument("--dtype", default="bfloat16", choices=[d for d in DTYPES if d != "auto"])
    parser.add_argument(
        "--quick", action="store_true", help="two families, tiny speed model, one setting (a smoke run)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="interleaved speed repetitions")
    parser.add_argument("--out-dir", default="runs/gpu-check", help="gpu_check.json and gpu_check.md go here")
    args = parser.parse_args(argv)
    try:
        check = run_gpu_check(args.device, args.dtype, args.quick, args.repeats)
    except VTokenError as exc:
        print("gpu-check: error: " + " ".join(str(exc).split()), file=sys.stderr)
        return 2
    command = "python -m vtoken.bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    report = markdown(check, command.strip())
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.md").write_text(report)
    (out / "gpu_check.json").write_text(json.dumps(check.to_dict(), indent=2))
    print(report)
    return 0 if check.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
