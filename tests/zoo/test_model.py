"""Processor, batching and offline loading of the tiny LLaVA (random weights, tiny sizes)."""

import numpy as np
import torch
from PIL import Image

from vtoken.zoo import build_prompt, load
from vtoken.zoo.attention import attention_share, plot_attention
from vtoken.zoo.data import IGNORE_INDEX, encode, make_item, train_items
from vtoken.zoo.export import export_split, save_model_folder
from vtoken.zoo.model import ZooModelConfig, build_model, build_processor
from vtoken.zoo.questions import sample
from vtoken.zoo.scenes import SOURCE_SIZE

TINY = ZooModelConfig(
    vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=32, text_layers=2, text_heads=2
)


def _tiny():
    torch.manual_seed(0)
    processor = build_processor(TINY)
    return build_model(TINY, processor.tokenizer), processor


def test_processor_expands_one_and_two_images():
    _, processor = _tiny()
    scene, qa = sample(5, "label")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for n in (1, 2):
        out = processor(text=[build_prompt(qa.question, n)], images=[[scene.image] * n], return_tensors="pt")
        assert int((out["input_ids"] == image_id).sum()) == 144 * n
        assert out["pixel_values"].shape == (n, 3, 96, 96)
        tokens = processor.tokenizer.convert_ids_to_tokens(out["input_ids"][0])
        assert tokens[:2] == ["<s>", "what"] and tokens[-2:] == ["answer", ":"]


def test_chat_template_matches_build_prompt():
    _, processor = _tiny()
    content = [{"type": "text", "text": "describe the scene ."}, {"type": "image"}, {"type": "image"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    assert text == build_prompt("describe the scene .", 2)


def test_labels_cover_only_the_answer():
    _, processor = _tiny()
    items = train_items(step=3, batch_size=4, crop_prob=0.0)
    batch = encode(processor, items, with_answers=True)
    tok = processor.tokenizer
    for i, item in enumerate(items):
        answer_ids = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert tok.decode(answer_ids) == f"{item.answer} </s>"
    assert batch["pixel_values"].shape[0] == 4


def test_train_batches_are_deterministic_and_crop_adds_an_image():
    a, b = train_items(7, 3, 1.0), train_items(7, 3, 1.0)
    assert all(len(x.images) == 2 for x in a)
    assert all(np.array_equal(x.images[1], y.images[1]) and x.question == y.question for x, y in zip(a, b))


def test_model_trains_on_two_image_batch():
    model, processor = _tiny()
    batch = encode(processor, train_items(1, 2, 1.0), with_answers=True)
    loss = model(**batch).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_loader_works_offline_from_saved_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, processor = _tiny()
    save_model_folder(model, processor, tmp_path / "m")
    loaded, proc = load(str(tmp_path / "m"))
    scene, qa = sample(11, "colour")
    item = make_item(scene, qa, with_crop=True, rng=np.random.default_rng(0))
    batch = encode(proc, [item], with_answers=False)
    with torch.no_grad():
        ref = model(**encode(processor, [item], with_answers=False)).logits
        got = loaded(**batch).logits
    torch.testing.assert_close(got, ref)
    out = loaded.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] <= batch["input_ids"].shape[1] + 3


def test_export_split_writes_jsonl_with_images(tmp_path):
    import json

    path = export_split(tmp_path / "test.jsonl", "test", per_family=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 7 and {"image", "question", "answer", "family"} <= set(rows[0])
    assert all((tmp_path / r["image"]).is_file() for r in rows)
    label = next(r for r in rows if r["family"] == "label")
    assert len(label["bbox"]) == 4


def test_multi_turn_sequences_label_every_answer_and_no_question():
    _, processor = _tiny()
    items = train_items(step=3, batch_size=6, crop_prob=0.0, turns=4)
    assert any(it.follow_ups for it in items)
    batch = encode(processor, items, with_answers=True)
    tok = processor.tokenizer
    for i, item in enumerate(items):
        if item.family == "describe":
            assert item.follow_ups == ()  # a description would give later answers away
        questions = [item.question] + [q for q, _ in item.follow_ups]
        assert len(set(questions)) == len(questions)
        answers = [item.answer] + [a for _, a in item.follow_ups]
        labelled = batch["labels"][i][batch["labels"][i] != IGNORE_INDEX].tolist()
        assert tok.decode(labelled) == " ".join(f"{a} </s>" for a in answers)
    crop_items = train_items(step=3, batch_size=2, crop_prob=1.0, turns=4)
    assert all(it.follow_ups == () for it in crop_items)  # the crop belongs to the first question


def test_word_and_visual_tokens_enter_the_decoder_at_similar_scales():
    torch.manual_seed(0)
    config = ZooModelConfig()
    processor = build_processor(config)
    model = build_model(config, processor.tokenizer)
    scene, qa = sample(3, "colour")
    batch = encode(processor, [make_item(scene, qa, False, np.random.default_rng(0))], with_answers=False)
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[0][0]  # (T, D) decoder input
    visual = batch["input_ids"][0] == model.config.image_token_id
    ratio = hidden[visual].norm(dim=-1).mean() / hidden[~visual].norm(dim=-1).mean()
    assert 0.5 < ratio < 2.0, ratio  # neither kind of token swamps the other (see _init_input_scales)


def test_attention_share_normalises_over_the_first_image():
    model, processor = _tiny()
    scene, qa = sample(2, "colour")
    items = [make_item(scene, qa, False, np.random.default_rng(0))]
    whole = attention_share(model, processor, items, [(0, 0, SOURCE_SIZE, SOURCE_SIZE)])
    assert [a["layer"] for a in whole] == [0, 1]
    assert all(abs(a["mass"] - 1) < 1e-5 and a["area"] == 1 for a in whole)
    left = attention_share(model, processor, items, [(0, 0, SOURCE_SIZE // 2, SOURCE_SIZE)])
    right = attention_share(model, processor, items, [(SOURCE_SIZE // 2, 0, SOURCE_SIZE, SOURCE_SIZE)])
    for a, b in zip(left, right):
        assert a["area"] == b["area"] == 0.5 and abs(a["mass"] + b["mass"] - 1) < 1e-5
        assert a["ratio"] == a["mass"] / 0.5


def test_attention_figure_has_a_row_per_question(tmp_path):
    model, processor = _tiny()
    pairs = [sample(k, "colour") for k in (2, 3)]
    items = [make_item(scene, qa, False, np.random.default_rng(0)) for scene, qa in pairs]
    boxes = [qa.box for _, qa in pairs]
    path = plot_attention(model, processor, items, boxes, tmp_path / "a.png", range(1, 2))
    assert Image.open(path).size == (3 * 2 * 72, round(2 * 2.1 * 72))  # 2 rows of scene + 2 layers, 72 dpi
