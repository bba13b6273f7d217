"""VLA policies: OpenVLA-style action tokens (``ActionTokenizer``) and the ``reset`` /
``select_action`` wrapper around a VLM (``VLAPolicy``).

OpenVLA (Kim et al., 2024) discretises each action dimension into 256 uniform bins and maps bin
``k`` to a reserved vocabulary id; the model writes one token per dimension and greedy decoding
picks them. Our bins are 256 equal intervals of ``[low, high]`` decoded to their centres (OpenVLA
uses 256 edges of ``linspace(-1, 1)`` and bin centres between them, so 255 usable bins).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vtoken.session import active_session

ACTION_TOKENIZER_FILE = "action_tokenizer.json"


@dataclass(frozen=True)
class ActionTokenizer:
    """Maps continuous actions to vocabulary ids and back.

    Args:
        token_ids: the reserved vocabulary ids, one per bin in bin order (bin ``k`` is
            ``token_ids[k]``); ``len(token_ids)`` bins per dimension (256 in OpenVLA).
        dims: action dimensions (tokens per action).
        low: lower end of every dimension's range; smaller actions fall in bin 0.
        high: upper end; larger actions fall in the last bin.
    """

    token_ids: tuple[int, ...]
    dims: int
    low: float = -1.0
    high: float = 1.0

    def __post_init__(self) -> None:
        if len(self.token_ids) < 2 or self.dims < 1 or not self.low < self.high:
            raise ValueError("ActionTokenizer needs >= 2 token_ids, dims >= 1 and low < high")

    @property
    def bins(self) -> int:
        """Bins per dimension."""
        return len(self.token_ids)

    @property
    def width(self) -> float:
        """Bin width; a decoded action is within ``width / 2`` of any in-range action."""
        return (self.high - self.low) / self.bins

    def to_bins(self, actions: np.ndarray) -> np.ndarray:
        """``(..., dims)`` float actions -> ``(..., dims)`` int64 bin indices (clipped to range)."""
        k = np.floor((np.asarray(actions, np.float64) - self.low) / self.width)
        return np.clip(k, 0, self.bins - 1).astype(np.int64)

    def encode(self, actions: np.ndarray) -> np.ndarray:
        """``(..., dims)`` float actions -> ``(..., dims)`` int64 vocabulary ids."""
        return np.asarray(self.token_ids, np.int64)[self.to_bins(actions)]

    def decode(self, ids: np.ndarray | torch.Tensor) -> np.ndarray:
        """``(..., dims)`` vocabulary ids -> ``(..., dims)`` float32 bin centres.

        Raises:
            ValueError: if an id is not an action token.
        """
        ids = np.asarray(ids.cpu() if isinstance(ids, torch.Tensor) else ids, np.int64)
        lookup = {t: k for k, t in enumerate(self.token_ids)}
        unknown = {int(i) for i in ids.ravel()} - lookup.keys()
        if unknown:
            raise ValueError(f"ids {sorted(unknown)} are not action tokens")
        k = np.vectorize(lookup.__getitem__, otypes=[np.int64])(ids)
        return (self.low + (k + 0.5) * self.width).astype(np.float32)

    def save(self, folder: str | Path) -> Path:
        """Write ``action_tokenizer.json`` into ``folder`` (beside a saved model); returns its path."""
        path = Path(folder) / ACTION_TOKENIZER_FILE
        path.write_text(json.dumps(asdict(self) | {"token_ids": list(self.token_ids)}, indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> ActionTokenizer:
        """Read the ``action_tokenizer.json`` that ``save`` wrote into ``folder``."""
        fields = json.loads((Path(folder) / ACTION_TOKENIZER_FILE).read_text())
        return cls(**fields | {"token_ids": tuple(fields["token_ids"])})


class ActionTokensOnly(LogitsProcessor):
    """Greedy decoding of action tokens: every id but the action tokens gets ``-inf``."""

    def __init__(self, token_ids: tuple[int, ...]):
        self.allowed = torch.tensor(token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """``(B, V)`` scores with non-action ids masked out."""
        masked = torch.full_like(scores, float("-inf"))
        allowed = self.allowed.to(scores.device)
        masked[:, allowed] = scores[:, allowed]
        return masked


class VLAPolicy:
    """A VLM plus an action tokenizer behind robot learning's policy interface (LeRobot's).

    ``select_action`` builds the prompt from ``task``, runs ``model.generate`` greedily for
    ``actions.dims`` tokens restricted to the action tokens, and decodes them to an action. Any
    supported VLM family works; vtoken plugins attach to ``policy.model`` as to any VLM.

    Args:
        model: a VLM (``LlavaForConditionalGeneration``, Qwen2-VL, ...).
        processor: its processor.
        actions: the action tokenizer (which vocabulary ids are bins).
        prompt: instruction -> prompt text with one image placeholder; default: the processor's
            chat template with one user turn (the instruction, then the image).
    """

    def __init__(
        self, model, processor, actions: ActionTokenizer, prompt: Callable[[str], str] | None = None
    ):
        self.model = model
        self.processor = processor
        self.actions = actions
        self.prompt = prompt or self._chat_prompt
        self._only_actions = LogitsProcessorList([ActionTokensOnly(actions.token_ids)])

    def reset(self) -> None:
        """Start of an episode: the policy keeps no history itself; the plugins attached to its
        model drop theirs (:meth:`vtoken.Session.start_episode`)."""
        session = active_session(self.model)
        if session is not None:
            session.start_episode()

    @torch.no_grad()
    def select_action(self, observation: dict) -> np.ndarray:
        """Action for one observation or a batch.

        Args:
            observation: ``observation.image`` (``(H, W, 3)`` uint8, or ``(3, H, W)`` float in
                [0, 1] as LeRobot gives it; a leading batch dimension for a batch),
                ``observation.state`` (unused by the model) and ``task`` (a string or a list).

        Returns:
            ``(dims,)`` float32 action, or ``(B, dims)`` for a batch.
        """
        images, tasks, batched = _as_batch(observation["observation.image"], observation["task"])
        texts = [self.prompt(t) for t in tasks]
        # left padding, so that every row's generated tokens follow its prompt directly
        inputs = self.processor(
            images=images, text=texts, padding=True, padding_side="left", return_tensors="pt"
        )
        inputs = inputs.to(self.model.device)
        out = self.model.generate(
            **inputs,
            max_new_tokens=self.actions.dims,
            min_new_tokens=self.actions.dims,
            do_sample=False,
            logits_processor=self._only_actions,
        )
        action = self.actions.decode(out[:, -self.actions.dims :])  # (B, dims)
        return action if batched else action[0]

    def _chat_prompt(self, task: str) -> str:
        content = [{"type": "text", "text": task}, {"type": "image"}]
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True
        )


def _as_batch(image, task) -> tuple[list[np.ndarray], list[str], bool]:
    """``(images as (H, W, 3) uint8 arrays, tasks, whether the input was batched)``."""
    image = image.cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    batched = image.ndim == 4
    images = image if batched else image[None]
    if images.dtype != np.uint8:  # LeRobot: (B, 3, H, W) float in [0, 1]
        images = (images.transpose(0, 2, 3, 1) * 255).round().clip(0, 255).astype(np.uint8)
    tasks = [task] * len(images) if isinstance(task, str) else list(task)
    return list(images), tasks, batched


def check_policy_source(source: str | Path) -> None:
    """Raise ``UnsupportedModelError`` unless ``source`` is something :func:`load_policy` loads."""
    from vtoken.errors import UnsupportedModelError
    from vtoken.zoo import MODELS_DIR, available

    if str(source).endswith(".pt"):
        if not Path(source).is_file():
            raise UnsupportedModelError(f"checkpoint {source} does not exist")
        return
    folder = Path(source) if Path(source).is_dir() else MODELS_DIR / str(source)
    if not (folder / ACTION_TOKENIZER_FILE).is_file():
        raise UnsupportedModelError(
            f"{source!r} is not a VLA (no {ACTION_TOKENIZER_FILE} in {folder}); bundled VLAs: "
            f"{available('vla')}, or an exported folder, or a training checkpoint (.pt)"
        )


def load_policy(source: str | Path, device: str = "cpu", dtype: str = "auto") -> VLAPolicy:
    """``VLAPolicy`` in eval mode from a bundled VLA's name (``vtoken.zoo.available("vla")``), an
    exported folder (``save_pretrained`` output plus ``action_tokenizer.json``) or a training
    checkpoint of ``vtoken.zoo.vla.train`` (``.pt``), on ``device`` in ``dtype``.

    Raises:
        UnsupportedModelError: ``source`` is none of these.
    """
    from vtoken.loading import load_model, place, resolve_device, resolve_dtype

    check_policy_source(source)
    if str(source).endswith(".pt"):
        from vtoken.zoo.vla.model import VLAModelConfig, action_tokenizer, build_model, build_processor

        state = torch.load(source, weights_only=False, map_location="cpu")
        config = VLAModelConfig(**state["config"]["model"])
        processor = build_processor(config)
        model = build_model(config, processor.tokenizer)
        model.load_state_dict(state["model"])
        model = place(model.eval(), resolve_device(device), resolve_dtype(dtype))
        return VLAPolicy(model, processor, action_tokenizer(processor.tokenizer, config))
    from vtoken.zoo import MODELS_DIR

    folder = Path(source) if Path(source).is_dir() else MODELS_DIR / str(source)
    model, processor = load_model(str(source), device=device, dtype=dtype)
    return VLAPolicy(model.eval(), processor, ActionTokenizer.load(folder))
