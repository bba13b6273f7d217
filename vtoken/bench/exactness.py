"""Exactness on a device and dtype: the checks of the test suite, run where the suite cannot.

For every plugin on a tiny model of every family (the test suite runs these in float32 on the CPU;
``make gpu-check`` repeats them in bfloat16 on a GPU, where other kernels run):

- do-nothing: the plugin's do-nothing setting gives the unplugged prefill logits, greedy tokens
  and step logits bit for bit;
- settings: every setting the plugin benchmarks attaches and generates;
- oracle: dropping a random schedule of visual tokens (:class:`vtoken.testing.FixedDrop`) matches
  dense eager attention with those keys masked out (:func:`vtoken.testing.masked_reference`) on
  a single prompt and a left-padded batch. Two kernels never agree bit for bit in bfloat16, so the
  error is compared with the noise floor: the same comparison on the unpruned model, where the
  only difference is the attention kernel (sdpa against eager).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch

import vtoken
from vtoken.loading import load_model, to_model
from vtoken.registry import get_plugin_class
from vtoken.testing import FixedDrop, masked_reference, sample_inputs, schedule_for

#: Each built-in plugin's do-nothing setting (keep every token, ...), as config fields.
GEN = dict(max_new_tokens=4, do_sample=False, output_logits=True, return_dict_in_generate=True)
#: The oracle passes when its error is within this multiple of the noise floor (plus 1e-6).
FLOOR_FACTOR = 4.0


@dataclass
class FamilyCheck:
    """One plugin on one family.

    Attributes:
        do_nothing_exact: ``None`` when the plugin has no known do-nothing setting.
        settings: each bench setting's outcome: ``"ok"``, ``"skipped: ..."`` or ``"failed: ..."``.
    """

    plugin: str
    family: str
    do_nothing_exact: bool | None
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.do_nothing_exact is not False and not any(
            s.startswith("failed") for s in self.settings.values()
        )


@dataclass
class OracleCheck:
    """Dropping tokens against the masked dense reference, on one family and batch kind.

    Attributes:
        error: largest ``|logit - reference|`` over the kept real tokens' prefill logits and the
            greedy step logits (each row up to its first differing token).
        floor: the same between sdpa and eager on the unpruned model.
        tokens_equal: the greedy tokens equal the reference's (reported; in bfloat16 a near-tie may
            flip one, as between any two attention kernels).
    """

    family: str
    batch: str
    error: float
    floor: float
    tokens_equal: bool

    @property
    def passed(self) -> bool:
        return self.error <= FLOOR_FACTOR * self.floor + 1e-6


def check_plugins(plugins: list[str], families: list[str], device: str, dtype: str) -> list[FamilyCheck]:
    """Do-nothing exactness and every bench setting of each plugin on each family."""
    checks = []
    for family in families:
        model, processor = load_model(f"tiny:{family}", device=device, dtype=dtype)
        inputs = to_model(sample_inputs(family, processor, batch=True), model)
        for name in plugins:
            checks.append(_check_plugin(model, inputs, name, family))
    return checks


def _check_plugin(model, inputs: dict, name: str, family: str) -> FamilyCheck:
    cls = get_plugin_class(name)
    exact, config = None, cls.do_nothing()
    if config is not None:
        exact = reproduces_unplugged(model, inputs, cls(config))
    check = FamilyCheck(name, family, exact)
    for label, config in cls.bench_settings().items():
        check.settings[label] = _try_setting(model, inputs, cls(config))
    return check


def _try_setting(model, inputs: dict, plugin: vtoken.Plugin) -> str:
    try:
        session = vtoken.attach(model, plugin)  # attaching checks the model, loads what it needs
    except (vtoken.VTokenError, ValueError) as exc:
        return f"skipped: {exc}"
    try:
        with session, torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, do_sample=False)
    except Exception as exc:  # noqa: BLE001 - reported, the other checks go on
        return f"failed: {type(exc).__name__}: {exc}"
    return "ok"


def _outputs(model, inputs: dict, plugins=None) -> tuple[torch.Tensor, ...]:
    """Prefill logits, then greedy tokens and step logits (``plugins=None``: unplugged)."""
    session = vtoken.attach(model, plugins) if plugins is not None else contextlib.nullcontext()
    with session, torch.no_grad():
        prefill = model(**inputs).logits
        gen = model.generate(**inputs, **GEN)
    return prefill, gen.sequences, torch.stack(gen.logits)


def _identical(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def reproduces_unplugged(model, inputs: dict, plugins) -> bool:
    """Whether ``plugins`` leave prefill logits, greedy tokens and step logits bit-identical."""
    return _identical(_outputs(model, inputs), _outputs(model, inputs, plugins))


def check_oracle(families: list[str], device: str, dtype: str) -> list[OracleCheck]:
    """The token runtime against the masked dense reference, single prompt and padded batch."""
    checks = []
    for family in families:
        model, processor = load_model(f"tiny:{family}", device=device, dtype=dtype)
        for batch in (False, True):
            inputs = to_model(sample_inputs(family, processor, batch), model)
            kind = "padded batch" if batch else "single"
            checks.append(_oracle(model, inputs, family, kind))
    return checks


def _oracle(model, inputs: dict, family: str, kind: str) -> OracleCheck:
    last = vtoken.locate_parts(model).num_layers - 1
    schedule = schedule_for(model, inputs, (1, last))
    with torch.no_grad():
        with masked_reference(model, {}):
            eager = _reference(model, inputs)
        with masked_reference(model, schedule):
            reference = _reference(model, inputs)
        floor = _error(_reference(model, inputs), eager, None, inputs)[0]
        with vtoken.attach(model, FixedDrop(schedule)) as session:
            logits = model(**inputs).logits
            positions = session.state.seq_positions  # (B, T) original position of each kept token
            gen = model.generate(**inputs, **GEN)
    error, tokens_equal = _error((logits, gen), reference, positions, inputs)
    return OracleCheck(family, kind, error, floor, tokens_equal)


def _reference(model, inputs: dict) -> tuple[torch.Tensor, Any]:
    return model(**inputs).logits, model.generate(**inputs, **GEN)


def _error(run: tuple, reference: tuple, positions: torch.Tensor | None, inputs: dict) -> tuple[float, bool]:
    """Largest logit difference over the real prompt tokens (at their original positions) and the
    greedy steps whose earlier tokens agree, and whether all greedy tokens agree.

    Once a near-tie flips a token, the two runs continue from different texts and their later
    logits are no longer comparable, so a row's steps count up to its first disagreement.
    """
    (logits, gen), (ref_logits, ref_gen) = run, reference
    if positions is None:  # nothing dropped: every position
        positions = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    index = positions.clamp(min=0)  # (B, T) original positions of the kept tokens
    real = (positions != -1) & inputs["attention_mask"].bool().gather(1, index)
    at_kept = lambda x: x.gather(1, index[..., None].expand(-1, -1, x.shape[-1])).float()  # noqa: E731
    if logits.shape[1] != index.shape[1]:  # full-length logits: read them at the kept positions
        logits = at_kept(logits)
    prefill = (at_kept(ref_logits) - logits.float()).abs()[real].max()  # (B, T, V) -> over real tokens
    n = min(len(gen.logits), len(ref_gen.logits))
    steps = (torch.stack(gen.logits[:n]).float() - torch.stack(ref_gen.logits[:n]).float()).abs()  # (S, B, V)
    prompt = inputs["input_ids"].shape[1]
    agree = gen.sequences[:, prompt : prompt + n] == ref_gen.sequences[:, prompt : prompt + n]  # (B, S)
    before = torch.cat([torch.ones_like(agree[:, :1]), agree[:, :-1]], dim=1).cumprod(dim=1).bool()  # (B, S)
    step_error = steps.amax(-1).T[before].max()  # over (row, step) pairs with equal earlier tokens
    same = gen.sequences.shape == ref_gen.sequences.shape and torch.equal(gen.sequences, ref_gen.sequences)
    return max(float(prefill), float(step_error)), same
