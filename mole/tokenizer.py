"""A word-level tokenizer built from the data itself: no download, saved like any HF tokenizer.

The embedded benchmark speaks a closed vocabulary of a few dozen words, so a word-level
vocabulary is exact and tiny (~100 ids), which keeps the embedding matrix small on a CPU. It is
a real ``PreTrainedTokenizerFast``: ``save_pretrained`` writes ``tokenizer.json`` and
``AutoTokenizer.from_pretrained(path)`` loads it back, like the tokenizer of any local
checkpoint (a LLaVA checkpoint loaded by path brings its own tokenizer instead).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD, UNK, BOS, EOS, SEP = "<pad>", "<unk>", "<bos>", "<eos>", "<sep>"
IMAGE, AUDIO = "<image>", "<audio>"
SPECIAL_TOKENS = (PAD, UNK, BOS, EOS, SEP, IMAGE, AUDIO)


def build_word_tokenizer(texts: Iterable[str]) -> PreTrainedTokenizerFast:
    """Vocabulary = the special tokens, then every lowercase word of ``texts``, sorted.

    Sorting makes the ids a pure function of the word set (not of the order samples come in),
    so the same data always gives the same tokenizer.
    """
    words = sorted({w for t in texts for w in t.lower().split()} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *words))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=PAD,
        unk_token=UNK,
        bos_token=BOS,
        eos_token=EOS,
        sep_token=SEP,
        additional_special_tokens=[IMAGE, AUDIO],
    )
    tok.padding_side = "right"
    return tok


def ensure_special_tokens(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    """A tokenizer from a foreign checkpoint may lack our separator/placeholder tokens."""
    missing = [t for t in (SEP, IMAGE, AUDIO) if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing})  # type: ignore[dict-item]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.eos_token is None:
        raise ValueError("the checkpoint's tokenizer has no eos token; set one before training")
    return tok
