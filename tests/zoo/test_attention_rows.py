"""Attention rows recomputed from recorded queries and keys equal eager attention, values and gradients."""

import torch

from vtoken.patch import Patcher
from vtoken.zoo.attention_rows import AttentionRecorder
from vtoken.zoo.data import encode, train_items
from vtoken.zoo.model import ZooModelConfig, build_model, build_processor

TINY = ZooModelConfig(
    vision_hidden=16, vision_layers=1, vision_heads=2, text_hidden=16, text_layers=3, text_heads=4
)


def _setup():
    torch.manual_seed(0)
    processor = build_processor(TINY)
    model = build_model(TINY, processor.tokenizer)
    batch = encode(processor, train_items(3, 3, 0.0, grid=12, turns=3), with_answers=True)
    assert not batch["attention_mask"].all()  # right-padded rows: padding keys must stay masked
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    return model, inputs, batch


def _eager_rows(model, inputs, layer, rows, queries):
    model.set_attn_implementation("eager")
    attention = model(**inputs, output_attentions=True).attentions[layer]  # (B, H, T, T)
    return attention[rows[:, None], :, queries].transpose(1, 2)  # (N, H, R, T)


def _recorded_rows(model, inputs, layer, rows, queries):
    model.set_attn_implementation("sdpa")
    recorder, patcher = AttentionRecorder([layer]), Patcher()
    recorder.attach(model, patcher)
    try:
        model(**inputs)
        return recorder.rows(layer, rows, queries)
    finally:
        patcher.undo_all()


def test_recorded_rows_equal_eager_attention_and_pass_the_same_gradients():
    model, inputs, batch = _setup()
    rows, queries = torch.tensor([0, 2, 2]), torch.tensor([[5, 40], [7, 60], [150, 9]])
    grads = []
    for rows_of in (_eager_rows, _recorded_rows):
        model.zero_grad()
        got = rows_of(model, inputs, 1, rows, queries)
        (got[..., :50] ** 2).sum().backward()  # any function of the rows
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        if rows_of is _eager_rows:
            expected = got.detach()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-4, atol=1e-6)
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-3, atol=1e-7, msg=name)


def test_padding_keys_and_later_keys_get_no_attention():
    model, inputs, batch = _setup()
    padded = int((~batch["attention_mask"].bool()).any(1).nonzero()[0])
    length = int(batch["attention_mask"][padded].sum())
    queries = torch.tensor([[length - 1, 3]])
    got = _recorded_rows(model, inputs, 0, torch.tensor([padded]), queries)  # (1, H, 2, T)
    assert got[0, :, 0, length:].abs().max() == 0 and got[0, :, 1, 4:].abs().max() == 0
    torch.testing.assert_close(got.sum(-1), torch.ones(1, 4, 2))
