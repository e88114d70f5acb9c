"""Token ids for transformer encoders (plumbing of data.py, beside xc_files.py): texts cut and
tokenised as the encoder reads them, into rows (length, ids[max_length]); caches.token_cache
keeps a split's rows in a cache next to the data.
"""
import functools
import re

import numpy as np

import data

TOKENIZE_BATCH = 1000  # texts given to the tokenizer at a time


def load_tokenizer(name):
    from transformers import AutoTokenizer  # only transformer runs need it
    tokenizer = AutoTokenizer.from_pretrained(name)
    tokenizer.padding_side = "right"  # token_batch cuts padding off the right
    return tokenizer


def token_dtype(tokenizer, max_length):
    ids = np.uint16 if len(tokenizer) <= 1 << 16 else np.int32  # BERT's 30,522 ids fit 16 bits
    return np.dtype([("length", np.int32), ("ids", ids, (max_length,))])


@functools.lru_cache
def first_words(count):
    """`count` words: runs of non-blank characters, each ending at a blank or the end. Blanks are
    ASCII space, tab and newlines only: every tokenizer splits there (a Unicode space may be a
    control character that BERT deletes, joining the words beside it)."""
    return re.compile(r"(?:[ \t\n\r]*[^ \t\n\r]+(?![^ \t\n\r])){%d}" % count)


def encode(texts, tokenizer, max_length, dtype):
    """Rows (length, ids) of texts, truncated to max_length tokens, padded with the pad id.

    A transformer reads only the first max_length tokens and every word gives at least one, so a
    text is cut after max_length words before tokenising (at a blank, where the kept words
    tokenise exactly as in the whole text): a 700-word Wikipedia article costs 128 words, not 700.
    A cut text that still gives fewer tokens (words that tokenise to nothing) is tokenised whole."""
    cut = [match.group() if (match := first_words(max_length).match(text)) else text for text in texts]
    encoded = tokenizer(cut, max_length=max_length, truncation=True, padding="max_length", return_tensors="np")
    ids, lengths = encoded["input_ids"], encoded["attention_mask"].sum(1)
    again = [i for i, text in enumerate(texts) if lengths[i] < max_length and len(cut[i]) < len(text)]
    if again:
        whole = tokenizer([texts[i] for i in again], max_length=max_length, truncation=True, padding="max_length",
                          return_tensors="np")
        ids[again], lengths[again] = whole["input_ids"], whole["attention_mask"].sum(1)
    rows = np.empty(len(texts), dtype)
    rows["ids"], rows["length"] = ids, lengths
    return rows


def tokenize(texts, tokenizer, max_length, out=None):
    """Token rows of texts, TOKENIZE_BATCH at a time, into `out` (e.g. a memmap) or a new array."""
    texts = list(texts) if out is None else texts
    out = np.empty(len(texts), token_dtype(tokenizer, max_length)) if out is None else out
    start = 0
    for chunk in data.batched(texts, TOKENIZE_BATCH):
        out[start:start + len(chunk)] = encode(chunk, tokenizer, max_length, out.dtype)
        start += len(chunk)
    return out
