"""The word-level tokenizer every built-in task uses: one token per vocabulary word."""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0-3, pad first


def build_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over SPECIAL_TOKENS + `words` that prepends `<bos>` when special
    tokens are added.

    Prompts are encoded with `add_special_tokens=True` (`<bos>` first) and responses with
    `add_special_tokens=False`; decoding joins words with single spaces, so
    `decode(ids, skip_special_tokens=True)` of a response gives the response back.
    """
    vocab = {w: i for i, w in enumerate((*SPECIAL_TOKENS, *words))}
    if len(vocab) != len(SPECIAL_TOKENS) + len(words):
        raise ValueError("build_tokenizer: the vocabulary repeats a word or a special token")
    pad, bos, eos, unk = SPECIAL_TOKENS
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # No decoder: the tokenizers library then joins tokens with single spaces, which is exact here.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, vocab[bos])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        clean_up_tokenization_spaces=False,  # would glue `.` to the word before it
    )
