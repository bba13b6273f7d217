"""Training batches of the tiny VLA from demonstration frames (prompt, pixels, action labels)."""

from __future__ import annotations

import numpy as np
import torch
from transformers import LlavaProcessor

from vtoken.robot.policy import ActionTokenizer
from vtoken.zoo.vla.model import IMAGE_TOKEN, VLAModelConfig, build_prompt, pixel_values

IGNORE_INDEX = -100


def prompt_ids(processor: LlavaProcessor, instruction: str, config: VLAModelConfig) -> list[int]:
    """Token ids of ``instruction``'s prompt with ``<image>`` expanded to the visual tokens (what the
    processor produces, without running its image pipeline)."""
    image = " ".join([IMAGE_TOKEN] * config.num_image_tokens)
    text = build_prompt(instruction).replace(IMAGE_TOKEN, image)
    return processor.tokenizer(text, add_special_tokens=False)["input_ids"]


class FrameBatches:
    """Batches of frames; the batch of step ``s`` depends on ``(seed, s)`` only.

    Args:
        data: frames as loaded by ``vtoken.zoo.vla.data.load``.
        processor: the VLA's processor.
        actions: the action tokenizer.
        config: model sizes.
        seed: batch-sampling seed.
    """

    def __init__(
        self,
        data: dict[str, np.ndarray],
        processor: LlavaProcessor,
        actions: ActionTokenizer,
        config: VLAModelConfig,
        seed: int = 0,
    ):
        self.images = torch.from_numpy(data["image"])  # (N, H, W, 3) uint8
        self.labels = torch.from_numpy(actions.encode(data["action"]))  # (N, D) vocabulary ids
        self.patches = torch.from_numpy(data["patches"])  # (N, P) uint8 bit masks
        tasks, self.task_index = np.unique(data["task"], return_inverse=True)
        self.prompts = [prompt_ids(processor, str(t), config) for t in tasks]
        self.pad = processor.tokenizer.pad_token_id
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, step: int, batch_size: int, pool: np.ndarray) -> dict[str, torch.Tensor]:
        """Batch of ``batch_size`` frames drawn (with replacement) from the indices ``pool``."""
        rng = np.random.default_rng((self.seed, step))
        return self.make(rng.choice(pool, batch_size))

    def make(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Batch of the frames ``rows``: ``input_ids``, ``attention_mask``, ``labels`` ``(B, T)``
        (left-padded; labels only on the action tokens), ``pixel_values`` ``(B, 3, H, W)`` and
        ``patches`` ``(B, P)``."""
        seqs = [self.prompts[self.task_index[r]] + self.labels[r].tolist() for r in rows]
        width = max(map(len, seqs))
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(seqs):
            ids[i, width - len(seq) :] = torch.tensor(seq)
            mask[i, width - len(seq) :] = 1
        labels = torch.full_like(ids, IGNORE_INDEX)
        dims = self.labels.shape[1]
        labels[:, -dims:] = ids[:, -dims:]
        rows_t = torch.as_tensor(rows)
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "pixel_values": pixel_values(self.images[rows_t]),
            "patches": self.patches[rows_t],
        }
