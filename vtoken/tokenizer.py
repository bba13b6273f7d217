"""Word-level tokenizers built locally, for the bundled models and for tests (no hub access)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"


def build_word_tokenizer(
    words: Iterable[str],
    special_tokens: Sequence[str] = (),
    *,
    model_max_length: int = 4096,
    padding_side: str = "right",
) -> PreTrainedTokenizerFast:
    """Build a word-level fast tokenizer from a fixed vocabulary.

    Text is split on white space and punctuation; each piece maps to one id (unknown words to
    ``<unk>``). Ids are ``<pad>=0, <unk>=1, <s>=2, </s>=3``, then ``special_tokens`` in order (e.g.
    ``<image>``), then ``words`` in sorted order, so the same inputs always give the same ids.

    Args:
        words: ordinary vocabulary words (and punctuation marks).
        special_tokens: tokens matched before splitting and never split, such as ``<image>``.
        model_max_length: longest sequence the tokenizer will produce without warning.
        padding_side: where batches are padded ("left" for batched generation).

    Returns:
        A ``PreTrainedTokenizerFast`` that saves and loads with ``save_pretrained`` /
        ``AutoTokenizer.from_pretrained`` like any hub tokenizer.
    """
    base = [PAD, UNK, BOS, EOS]
    specials = [t for t in dict.fromkeys(special_tokens) if t not in base]
    plain = sorted(set(words) - set(base) - set(specials))
    vocab = {tok: i for i, tok in enumerate([*base, *specials, *plain])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        model_max_length=model_max_length,
        padding_side=padding_side,  # a constructor argument, so save_pretrained keeps it
    )
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok
