"""Dynamic-LLaVA's learned predictors (Huang et al., 2025), sized for the model they serve.

Both read the hidden states entering decoder layer K (K=2 in the paper):

- :class:`VisionPredictor` - a small transformer over the visual tokens with a *local* head (each
  token on its own) and a *global* head (the pooled image), whose sum is each token's keep logit;
  with ``PredictorSpec.query`` (our addition, on by default) a third term matches each token against
  the last prompt token's hidden state: the paper's predictor sees the image only, and against a
  frozen base model (the paper tunes it jointly) it cannot tell which object a question asks about;
- :class:`TextPredictor` - a per-token MLP giving each generated token a keep logit: whether its K/V
  is kept at layers >= K.

Weights are stored as safetensors next to a JSON file with the sizes and the layer K they were
trained for.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from vtoken import ConfigError, locate_parts


@dataclass(frozen=True)
class PredictorSpec:
    """Sizes of a predictor pair and where it reads.

    Args:
        hidden_size: the language model's width.
        layer: the decoder layer whose input hidden states the predictors read.
        width: the predictors' own width (512 in the paper for 7B models).
        depth: transformer layers of the vision predictor.
        heads: its attention heads.
        query: whether the vision predictor also reads the last prompt token (see the module).
    """

    hidden_size: int
    layer: int = 2
    width: int = 128
    depth: int = 2
    heads: int = 4
    query: bool = True


class VisionPredictor(nn.Module):
    """Keep logits ``(B, N)`` for visual tokens ``(B, N, D)`` (local + global head)."""

    def __init__(self, spec: PredictorSpec) -> None:
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(spec.hidden_size), nn.Linear(spec.hidden_size, spec.width))
        block = nn.TransformerEncoderLayer(
            spec.width, spec.heads, 4 * spec.width, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(block, spec.depth, enable_nested_tensor=False)
        self.local = nn.Linear(spec.width, 1)
        self.glob = nn.Linear(spec.width, spec.width)
        self.ask = (
            nn.Sequential(nn.LayerNorm(spec.hidden_size), nn.Linear(spec.hidden_size, spec.width))
            if spec.query
            else None
        )

    def forward(self, visual: Tensor, pad: Tensor, query: Tensor | None = None) -> Tensor:
        """Keep logits.

        Args:
            visual: ``(B, N, D)`` hidden states of the visual tokens (and padding).
            pad: ``(B, N)`` True on padding.
            query: ``(B, D)`` hidden state of the last prompt token (needed with ``spec.query``).

        Returns:
            ``(B, N)`` keep logits.
        """
        x = self.encoder(self.inp(visual), src_key_padding_mask=pad)  # (B, N, W)
        weights = (~pad).to(x.dtype)[..., None]
        pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1)  # (B, W)
        context = self.glob(pooled)  # (B, W)
        if self.ask is not None:
            if query is None:
                raise ValueError("this vision predictor reads the last prompt token: pass query (B, D)")
            context = context + self.ask(query)
        return self.local(x).squeeze(-1) + torch.einsum("bnw,bw->bn", x, context) / x.shape[-1] ** 0.5


class TextPredictor(nn.Module):
    """Keep logits ``(B, T)`` for text tokens ``(B, T, D)``."""

    def __init__(self, spec: PredictorSpec) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.LayerNorm(spec.hidden_size),
            nn.Linear(spec.hidden_size, spec.width),
            nn.GELU(),
            nn.Linear(spec.width, 1),
        )

    def forward(self, hidden: Tensor) -> Tensor:
        return self.mlp(hidden).squeeze(-1)


WEIGHTS = Path(__file__).parent / "weights"


def load_predictors(model: nn.Module, config) -> Predictors:
    """The predictors named by ``config.predictors`` (a folder, or a bundled model's name), else
    the ones trained for the attached model's folder name; checked against ``config.layers``.

    They are placed on the device of the decoder layer whose inputs they read and kept in float32,
    whatever the model's dtype: callers cast the hidden states to float32. They were trained in
    float32, they cost a negligible share of the model's compute (a few small layers over the
    visual tokens, once per prompt; a tiny MLP per generated token), and their logits only rank
    tokens, where bfloat16's 8-bit mantissa would turn close scores into ties.
    """
    name = config.predictors or Path(getattr(model.config, "_name_or_path", "") or "unnamed").name
    folder = Path(name) if Path(name).is_dir() else WEIGHTS / name
    try:
        predictors = Predictors.load(folder)
    except FileNotFoundError as exc:
        raise ConfigError(f"token_pruning.predictors: {exc}") from exc
    if config.layers != (predictors.spec.layer,):
        raise ConfigError(
            f"The predictors in {folder} were trained to prune at layer {predictors.spec.layer}; "
            f"set token_pruning.layers=[{predictors.spec.layer}]."
        )
    if predictors.spec.hidden_size != model.config.get_text_config().hidden_size:
        raise ConfigError(f"token_pruning.predictors: {folder} was trained for another model's width.")
    layer = locate_parts(model).layers[predictors.spec.layer]
    return predictors.to(next(layer.parameters()).device)


class Predictors(nn.Module):
    """The vision and output-text predictors of one model."""

    def __init__(self, spec: PredictorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.vision = VisionPredictor(spec)
        self.text = TextPredictor(spec)

    def save(self, folder: str | Path) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, folder / "predictors.safetensors")
        (folder / "predictors.json").write_text(json.dumps(asdict(self.spec), indent=2))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> Predictors:
        folder = Path(folder)
        if not (folder / "predictors.json").is_file():
            raise FileNotFoundError(
                f"No trained predictors in {folder} (expected predictors.json and .safetensors); "
                "train them with `python -m vtoken_plugins.token_pruning.train`."
            )
        spec = PredictorSpec(**json.loads((folder / "predictors.json").read_text()))
        predictors = cls(spec)
        predictors.load_state_dict(load_file(folder / "predictors.safetensors"))
        return predictors.eval()
