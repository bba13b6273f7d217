"""Every selection, scoring, eviction, index, mask and cache function stays on the device it meets.

The functions run under ``FakeTensorMode`` on fake CUDA tensors (made with ``device="cuda"``) on this
CPU-only machine: any op mixing one with a CPU tensor (a ``torch.arange`` without ``device=``, say)
raises ``FakeTensorDeviceMismatchError`` (the ``meta`` device would let a CPU ``arange`` scattered into
it pass). A ``ShapeEnv`` lets ``nonzero`` and ``item()`` trace: the sizes they produce become symbols.
Python branches on tensor values (``bool(t.any())``, ``int(t)``, ``t.tolist()``) cannot run there;
the few functions that need them are listed at the end of this file.
"""

from __future__ import annotations

import types

import pytest
import torch
from conftest import CUDA, on_cuda
from torch._subclasses.fake_tensor import FakeTensorMode
from torch._subclasses.fake_tensor import unset_fake_temporarily as disable_fake_mode
from vtoken_plugins.token_pruning import decode, scorers
from vtoken_plugins.token_pruning.config import TokenPruningConfig
from vtoken_plugins.token_pruning.predictors import Predictors, PredictorSpec

from vtoken import PrunableLayer, RunState, VisualLayout, VTokenCache
from vtoken.indexing import gather_tokens, left_pack, scatter_tokens
from vtoken.masks import as_attention_mask
from vtoken.probe import LanguageAttention, Probe, ProbeSpec, attention_rows, select_rows
from vtoken.runtime import PruneView, TokenRuntime
from vtoken.vision_probe import VisionProbe

B, L, D = 2, 10, 16  # batch, prompt length, hidden size
POSITIONS = [[1, 2, 3, 4, 6, 7], [4, 5, -1, -1, -1, -1]]  # visual tokens of each row (-1 pads)
SEGMENTS = [[0, 0, 0, 0, 1, 1], [0, 0, -1, -1, -1, -1]]


pytestmark = pytest.mark.usefixtures("fake_mode")  # every test on fake CUDA tensors (conftest)


def cuda(values, dtype=None) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=CUDA)


def randn(*shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, dtype=dtype, device=CUDA)


def full(*shape: int, value=True) -> torch.Tensor:
    """A constant fake CUDA tensor (bool by default)."""
    return torch.full(shape, value, device=CUDA)


def layout() -> VisualLayout:
    return VisualLayout(positions=cuda(POSITIONS), segments=cuda(SEGMENTS))


def state(**fields) -> RunState:
    """A run state over a prompt of length L with the visual tokens of ``layout()``."""
    return RunState(layout=layout(), query_length=L, prompt_mask=full(B, L, value=1), **fields)


def view(hidden_dtype=torch.float32, device: str = CUDA, **state_fields) -> PruneView:
    """A decision-layer view on ``device`` (the run state's tensors stay on ``CUDA``): every prompt
    token present, the visual ones left-packed."""
    positions = torch.arange(L, device=device).expand(B, L)
    visual = torch.tensor([[1, 2, 3, 4, 6, 7], [0, 0, 0, 0, 4, 5]], device=device)
    visual_pad = torch.tensor([[False] * 6, [True] * 4 + [False] * 2], device=device)
    hidden = torch.randn(B, L, D, dtype=hidden_dtype, device=device)
    return PruneView(2, hidden, positions, visual, visual_pad, state(**state_fields))


def probe(rows: int = 1, keys: int = L) -> Probe:
    """Attention of ``rows`` query rows over ``keys`` keys at logical positions ``0 .. keys - 1``."""
    key_positions = torch.arange(keys, device=CUDA).expand(B, keys)
    weights = randn(B, 1, rows, keys).softmax(-1)
    return Probe(weights, full(B, rows, value=0), full(B, rows, value=False), key_positions)


def predictors(mode: FakeTensorMode) -> Predictors:
    """Untrained predictors on fake CUDA, in train mode: the fused encoder fast path of eval mode
    does not run on fake tensors, and with dropout 0 both modes compute the same."""
    with disable_fake_mode():  # built for real: nn.TransformerEncoder deep-copies its layer
        module = Predictors(PredictorSpec(hidden_size=D, width=8, heads=2)).train()
    for sub in module.modules():  # fake parameters cannot be moved (``.to``): replace them
        for name, param in sub.named_parameters(recurse=False):
            sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(param).to(CUDA), requires_grad=False)
    return module


# -- vtoken.indexing --------------------------------------------------------------------------------


def test_left_pack_gather_and_scatter_tokens():
    keep = randn(B, L) > 0
    index, pad = left_pack(keep)
    assert on_cuda(index, pad)
    rotary = randn(3, 1, L, 4)  # an M-RoPE table, its batch axis (1) broadcast
    assert on_cuda(gather_tokens(randn(B, L, D), index, 1), gather_tokens(rotary, index, -2, 1))
    assert on_cuda(gather_tokens(full(B, 1, L, L), index, 3))
    assert on_cuda(scatter_tokens(randn(B, 6, D), cuda([[0, 1, 3, 5, 8, 9], [-1, 0, 1, 5, 8, 9]]), L))


# -- vtoken.layout ----------------------------------------------------------------------------------


def test_layout_from_input_ids_and_its_views():
    ids = cuda([[5, 9, 9, 9, 9, 6, 9, 9, 7, 7], [5, 6, 7, 9, 9, 8, 8, 8, 8, 8]])
    found = VisualLayout.from_input_ids(ids, (9,), tokens_per_image=2)
    assert on_cuda(found.positions, found.segments, found.mask, found.counts, found.is_visual(L))
    given = layout()
    assert on_cuda(given.num_images, given.is_visual(L))


# -- vtoken.cache -----------------------------------------------------------------------------------


def kv(n: int) -> torch.Tensor:
    return randn(B, 2, n, 4)


def test_cache_layer_prefill_decode_evict_and_rollback():
    layer = PrunableLayer()
    layer.expect(cuda([[0, 2, 5, 6], [-1, 1, 2, 6]]), L)  # a pruned prefill of L tokens
    layer.update(kv(4), kv(4))
    layer.update(kv(1), kv(1))  # a decode step: its logical position is made here
    assert on_cuda(layer.positions)
    layer.evict(randn(B, 5) > 0)
    layer.update(kv(1), kv(1))
    layer.crop(-1)
    assert on_cuda(layer.keys, layer.values, layer.positions)
    layer.batch_repeat_interleave(2)
    layer.batch_select_indices(cuda([0, 3]))
    layer.reorder_cache(cuda([1, 0]))
    assert on_cuda(layer.keys, layer.positions)


def new_cache(num_layers: int) -> VTokenCache:
    text = types.SimpleNamespace(num_hidden_layers=num_layers)
    return VTokenCache(types.SimpleNamespace(get_text_config=lambda decoder: text))


def test_vtoken_cache_counts():
    cache = new_cache(2)
    cache.expect(0, cuda([[0, 2, 3], [1, 2, 3]]), 4)
    cache.update(kv(3), kv(3), 0)
    cache.evict(0, cuda([[True, False, True], [True, True, True]]))
    assert on_cuda(cache.held_positions(0), cache.dropped(0))


# -- vtoken.probe -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", ["last", "text", "all"])
def test_probe_rows(rows):
    seq_positions = cuda([[0, 1, 3, 5, 8, 9], [-1, 0, 1, 5, 8, 9]])
    index, pad = select_rows(ProbeSpec(rows=rows), state(), seq_positions)
    assert on_cuda(index, pad)


@pytest.mark.parametrize("mask", ["causal", "bool", "additive"])
def test_attention_rows(mask):
    query, key = randn(B, 4, L, 8), randn(B, 2, L, 8)
    masks = {"causal": None, "bool": full(B, 1, L, L), "additive": full(B, 1, L, L, value=0.0)}
    rows = cuda([[L - 1], [L - 2]])
    weights = attention_rows(query, key, masks[mask], rows, 0.35, softcap=50.0)
    assert on_cuda(weights, probe(rows=3).mean_over_rows())


@pytest.mark.parametrize("phase,pruned", [("prefill", False), ("decode", False), ("decode", True)])
def test_language_probe_capture(phase, pruned):
    probes = object.__new__(LanguageAttention)
    probes.state = state(phase=phase)
    if pruned:  # the layer's cache holds a pruned prompt (else: no vtoken cache, keys 0..T-1)
        probes.state.cache = new_cache(1)
        probes.state.cache.expect(0, cuda([[0, 2, 3], [1, 2, 3]]), L)
        probes.state.cache.update(kv(3), kv(3), 0)
    q = 1 if phase == "decode" else L
    query, key = randn(B, 4, q, 8), randn(B, 2, 4 if q == 1 else L, 8)
    for spec in (ProbeSpec(rows="last"), ProbeSpec(rows="text", per_head=True)):
        probes._capture(0, spec, query, key, None, {"scaling": 0.35})
        captured = probes.state.probes[(0, spec)]
        assert on_cuda(captured.weights, captured.rows, captured.row_pad, captured.key_positions)


# -- vtoken.vision_probe ----------------------------------------------------------------------------


def vision_probe(query: str = "cls", **config) -> VisionProbe:
    probe = object.__new__(VisionProbe)
    probe.spec = types.SimpleNamespace(vision_query=query)
    probe.model = types.SimpleNamespace(config=types.SimpleNamespace(**config))
    return probe


@pytest.mark.parametrize("query", ["cls", "global"])
def test_vision_importance(query):
    q, k = randn(B, 2, 5, 8), randn(B, 2, 5, 8)
    for mask in (None, full(B, 1, 5, 5), full(B, 1, 5, 5, value=0.0)):
        assert on_cuda(vision_probe(query)._importance(q, k, mask, 0.35))


def test_vision_token_maps(monkeypatch):
    chunks = [randn(2, 17)]  # two crops of [CLS] + 4x4 patches
    identity = vision_probe("cls", vision_feature_select_strategy="default")._map_identity(chunks, {})
    vision = types.SimpleNamespace(spatial_merge_size=2, window_size=8, patch_size=2)
    merge = vision_probe("global", vision_config=vision)
    merged = merge._map_merge([randn(1, 16)], {})
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    connector = types.SimpleNamespace(pixel_shuffle=lambda x, s: Idefics3Connector.pixel_shuffle(None, x, s))
    connector.scale_factor = 2
    merge.session = types.SimpleNamespace(parts=types.SimpleNamespace(projector=connector))
    shuffled = merge._map_pixel_shuffle([randn(2, 16)], {})
    # transformers builds Qwen2.5-VL's window order on the CPU, from grid_thw read on the host
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    order = lambda grid, **kw: (torch.arange(4).flip(0), None)  # noqa: E731
    monkeypatch.setattr(qwen, "get_vision_window_index", order, raising=False)  # a tower method in 5.2
    merge.session.parts.vision_tower = object.__new__(qwen.Qwen2_5_VisionTransformerPretrainedModel)
    merge.grid_thw = cuda([[1, 4, 4]])
    windowed = merge._map_window_merge([randn(1, 16)], {})
    assert on_cuda(identity, merged, shuffled, windowed)


# -- vtoken.runtime (the views and mask helpers a pruning plugin relies on) --------------------------


@pytest.mark.parametrize("expansion", [1, 2])
def test_prune_view_positions_segments_and_vision_scores(expansion):
    scores = randn(8 if expansion == 1 else 6)  # one per real visual token of each encoded row
    vision = types.SimpleNamespace(token_scores=lambda inputs: scores)
    pruned = view(vision_probe=vision, expansion=expansion)
    assert on_cuda(pruned.visual_positions, pruned.visual_segments, pruned.vision_scores(), pruned.num_visual)


def runtime(eager: bool) -> TokenRuntime:
    rt = object.__new__(TokenRuntime)
    rt.eager, rt.state = eager, state()
    return rt


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager"])
def test_runtime_masks(eager):
    rt = runtime(eager)
    index, pad = cuda([[0, 1, 3, 5], [0, 0, 2, 5]]), cuda([[False] * 4, [True] + [False] * 3])
    dtype = torch.bfloat16
    given, additive = full(B, 1, L, L), full(B, 1, L, L, value=0.0).to(dtype)
    columns, rows = cuda([[0, 1, 3, 5, 10], [-1, 0, 2, 5, 10]]), cuda([[10], [10]])
    masks = [
        rt._prefill_mask(given, index, pad, dtype),
        rt._prefill_mask(additive, index, pad, dtype),
        rt._decode_mask(given[:, :, :1, :11], columns, rows, dtype),
        rt._decode_mask(additive[:, :, :1, :11], columns, rows, dtype),
        as_attention_mask(given, dtype, eager),
    ]
    assert on_cuda(*masks) and masks[1].dtype == dtype


def test_runtime_prefill_inputs_decode_mask_and_merge():
    rt = runtime(eager=True)
    rt.state.cache = new_cache(1)
    positions = cuda([[0, 1, 3, 5, 8, 9], [-1, 0, 1, 5, 8, 9]])
    cos, sin = randn(1, L, 8), randn(1, L, 8)
    kwargs = {
        "position_embeddings": (cos, sin),
        "position_ids": torch.arange(L, device=CUDA)[None],
        "attention_mask": full(B, 1, L, L, value=0.0),
    }
    rt._fix_prefill_inputs(0, positions, kwargs)
    assert on_cuda(*kwargs["position_embeddings"], kwargs["position_ids"], kwargs["attention_mask"])
    rt.state.cache.update(kv(6), kv(6), 0)
    rt.state.query_length = 1  # a decode step over the pruned prompt
    step = {
        "position_embeddings": (cos[:, :1], sin[:, :1]),
        "attention_mask": full(B, 1, 1, L + 1, value=0.0),
    }
    rt._decode(0, step)
    assert on_cuda(step["attention_mask"], rt._current_positions(randn(B, L, D)))
    rt.decisions = {2: [types.SimpleNamespace(merge=lambda layer, view, keep: randn(B, 6, D))]}
    assert on_cuda(rt._merge(2, view(), full(B, 6)))


def test_runtime_restores_the_prompt_length():
    rt = runtime(eager=False)
    rt.state.phase, rt.state.seq_positions = "prefill", cuda([[0, 1, 3, 5, 8, 9], [-1, 0, 1, 5, 8, 9]])
    rt.state.layer_positions = {0: None, 1: rt.state.seq_positions}
    hidden = randn(B, L, D), randn(B, 6, D), randn(B, 6, D)  # inputs of layers 0, 1; final output
    output = types.SimpleNamespace(last_hidden_state=hidden[-1], hidden_states=hidden)
    output = rt._restore_length(None, (), {}, output)
    assert on_cuda(output.last_hidden_state, *output.hidden_states)
    assert output.last_hidden_state.shape == (B, L, D)


# -- token_pruning: scorers -------------------------------------------------------------------------


def test_top_k_mask():
    keep = scorers.top_k_mask(randn(B, 6, dtype=torch.bfloat16), view().visual_pad, cuda([3, 1]))
    assert on_cuda(keep)


@pytest.mark.parametrize("name", ["fastv", "text_guided", "random", "diversity", "learned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scorers_select(name, dtype, fake_mode):
    scorer = scorers.make_scorer(name, pivots=2, seed=0, ratio=0.5)
    if name == "learned":
        scorer.bind(predictors(fake_mode))
    captured = probe(rows=3) if name == "text_guided" else probe()
    keep = scorer.select(view(dtype), cuda([3, 1]), captured)
    assert on_cuda(keep) and keep.dtype == torch.bool


@pytest.mark.parametrize("contextual", [0, 2])
def test_vision_cls_select_and_merge(contextual):
    scores = randn(8)
    vision = types.SimpleNamespace(token_scores=lambda inputs: scores)
    pruned, scorer = view(torch.bfloat16, vision_probe=vision), scorers.VisionCls(contextual)
    keep = scorer.select(pruned, cuda([4, 2]), None)
    merged = scorer.merge(pruned, keep)
    assert on_cuda(keep) and (merged is None or (on_cuda(merged) and merged.dtype == torch.bfloat16))


def test_downsample_merge():
    scorer = scorers.Downsample(0.25)
    scorer._cells = [[[0, 1, 2, 3], [4, 5]], [[4, 5]]]  # what select plans on the host
    merged = scorer.merge(view(torch.bfloat16), full(B, 6))
    assert on_cuda(merged) and merged.dtype == torch.bfloat16


# -- token_pruning: decode-time thinning ------------------------------------------------------------


def test_accumulate_keep_mask_and_share():
    held = cuda([[-1, 0, 2, 3, 5, 6], [0, 1, 2, 4, 5, 6]])
    importance = decode.accumulate(full(B, 5, value=1.0), randn(B, 6, dtype=torch.bfloat16), held, 7)
    keep = decode.keep_mask(held, importance, full(B, 7), decode.share(cuda([4, 3]), 0.5))
    assert on_cuda(importance, keep)


def evicted(second_layer: str = CUDA) -> VTokenCache:
    """Attention thinning's first eviction on a 2-layer cache (pruning from layer 1) after a prefill
    of L tokens and 4 decode steps; layer 0 (probed) on ``CUDA``, layer 1 on ``second_layer``."""
    thin = dict(decode_keep_ratio=0.5, decode_visual_ratio=0.5, decode_interval=1, decode_window=1)
    thinning = decode.AttentionThinning(
        TokenPruningConfig(layers=(1,), **thin), ProbeSpec("last", decode=True)
    )
    run = state(prompt_ids=full(B, L, value=0), decode_steps=3, cache=new_cache(2))
    for layer, device in enumerate((CUDA, second_layer)):
        for n in (L, 1, 1, 1, 1):
            entries = torch.randn(B, 2, n, 4, device=device)
            run.cache.update(entries, entries, layer)
    run.probes[(0, thinning.probe)] = probe(keys=L + 4)
    thinning.reset(run)
    thinning.after_decode(run)
    return run.cache


def test_attention_thinning_evicts_on_the_cache_device():
    cache = evicted()
    assert on_cuda(cache.held_positions(1), cache.layers[1].keys)


def test_learned_thinning_reads_the_newest_token_in_float32(fake_mode):
    thinning = decode.LearnedThinning(predictors(fake_mode), layer=1)
    thinning.capture(None, (randn(B, 1, D, dtype=torch.bfloat16),), {})
    assert on_cuda(thinning.logits) and thinning.logits.dtype == torch.float32


# -- a model split over two GPUs (``device_map``): the inputs, the vision tower and layer K - 1 on
# the first (``CUDA``), layer K and later on the second ---------------------------------------------

SECOND = "cuda:1"


def on_second(*tensors: torch.Tensor) -> bool:
    return all(t.device == torch.device(SECOND) for t in tensors)


@pytest.mark.parametrize("name", ["fastv", "text_guided"])
def test_attention_scorers_on_a_split_model(name):
    scorer = scorers.make_scorer(name, pivots=2, seed=0, ratio=0.5)
    probed = probe(rows=3) if name == "text_guided" else probe()  # captured at layer K - 1
    keep = scorer.select(view(device=SECOND), torch.tensor([3, 1], device=SECOND), probed)
    assert on_second(keep)


def test_vision_scores_on_a_split_model():
    scores = randn(8)  # the vision tower's, on the first GPU
    pruned = view(device=SECOND, vision_probe=types.SimpleNamespace(token_scores=lambda inputs: scores))
    assert on_second(pruned.vision_scores(), pruned.visual_segments)
    assert on_second(scorers.VisionCls(2).select(pruned, torch.tensor([4, 2], device=SECOND), None))


def test_attention_thinning_on_a_split_model():
    cache = evicted(second_layer=SECOND)
    assert on_second(cache.held_positions(1), cache.layers[1].keys)


# Not runnable under fake tensors (each needs a tensor's value on the host; none creates a tensor
# off the device it meets):
# - vtoken.cache.PrunableLayer.is_dense / has_padding: Python flags read from the positions;
# - vtoken.runtime.TokenRuntime._prefill_mask / _decode_mask without a given mask (``pad.any()``),
#   _decide (``visual.shape[1] == 0``, ``drop.any()``), _visual_count (``int``);
# - token_pruning's Downsample.select (each image's grid of cells is planned on the host),
#   LearnedThinning.after_decode (``drop.any()``) and TokenPruning.budget (``tolist``);
# - vtoken.vision_probe: the LLaVA-NeXT map (image sizes on the host); vtoken.flops reads token
#   counts and grids on the host and makes no tensors.
