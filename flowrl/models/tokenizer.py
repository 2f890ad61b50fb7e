"""A CLIP BPE tokenizer that needs no download.

open-clip-torch ships the CLIP byte-pair vocabulary (``bpe_simple_vocab_16e6.txt.gz``). The
vocabulary and merges that ``transformers.CLIPTokenizer`` wants are derived from it the same
way OpenAI's CLIP builds them: 256 byte symbols, the same with the end-of-word marker ``</w>``,
one symbol per merge, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens).
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from bytes to printable unicode characters (GPT-2 scheme)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def _cache_dir() -> Path:
    root = os.environ.get("FLOWRL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "flowrl")
    return Path(root) / "clip_tokenizer"


@lru_cache(maxsize=1)
def clip_tokenizer_files() -> tuple[str, str]:
    """Write ``vocab.json`` and ``merges.txt`` once (atomically) and return their paths."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)

    out = _cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = out / "vocab.json", out / "merges.txt"
    if not (vocab_file.exists() and merges_file.exists()):
        for path, text in (
            (vocab_file, json.dumps({tok: i for i, tok in enumerate(vocab)})),
            (merges_file, "#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n"),
        ):
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
    return str(vocab_file), str(merges_file)


def offline_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """The CLIP tokenizer Stable Diffusion uses, built from open-clip-torch's vocabulary."""
    vocab_file, merges_file = clip_tokenizer_files()
    return CLIPTokenizer(
        vocab_file, merges_file, model_max_length=model_max_length, pad_token="<|endoftext|>"
    )


def offline_t5_tokenizer(words: Sequence[str] = (), model_max_length: int = 512):
    """A T5 tokenizer (``T5TokenizerFast``: a SentencePiece-style Unigram model) built in code, for
    tiny test pipelines: T5's special ids (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), every printable
    ASCII character with and without the word-start mark ``▁``, and ``words`` as whole pieces (more
    likely than spelling them out). No sentinel ``<extra_id_*>`` tokens."""
    import string

    from transformers import T5TokenizerFast

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [(p + c, -8.0) for c in chars for p in ("▁", "")]
    vocab += [("▁" + w, -3.0) for w in dict.fromkeys(words) if len(w) > 1]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
