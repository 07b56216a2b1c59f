"""A GGUF file's tokenizer (vocabulary, merges or scores, special tokens, chat
template) rebuilt as a Hugging Face fast tokenizer, wrapped as mlx-lm wraps the
tokenizers it loads (streaming detokenizer, EOS ids)."""

from typing import Dict, List, Tuple

from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    SPMStreamingDetokenizer,
    TokenizerWrapper,
)
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from mlx_kvcache.errors import UserError

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
_UNKNOWN, _CONTROL, _USER_DEFINED = 2, 3, 4

_GPT2_REGEX = (
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> how byte-level BPE splits text before merging (the same
# expressions as the models' tokenizer.json files; llama.cpp names them).
_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _split(regex: str):
    return pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False)


def _byte_level_pre_tokenizer(pre: str):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in ("llama-bpe", "llama3"):
        return pre_tokenizers.Sequence([_split(_LLAMA3_REGEX), byte_level])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return pre_tokenizers.Sequence([_split(_QWEN2_REGEX), byte_level])
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), _split(_GPT2_REGEX), byte_level]
        )
    if pre in ("gpt2", "default", "gpt-2"):
        return pre_tokenizers.Sequence([_split(_GPT2_REGEX), byte_level])
    raise UserError(f"GGUF tokenizer pre-tokenizer {pre!r} is not supported")


def _spm_merges(vocab: Dict[str, int], scores: List[float]) -> List[Tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: every split of a piece
    into two pieces, merged in order of the whole piece's score (as Hugging
    Face's converter derives them)."""
    merges = []
    for piece, piece_id in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((scores[piece_id], vocab[left], vocab[right], left, right))
    merges.sort(key=lambda m: (-m[0], m[1], m[2]))
    return [(left, right) for _, _, _, left, right in merges]


def _scalar(metadata, key, default=None):
    value = metadata.get(key)
    return default if value is None else value.item()


def load_tokenizer(metadata: dict) -> TokenizerWrapper:
    try:
        return _load_tokenizer(metadata)
    except Exception as e:  # the tokenizers library raises plain Exception
        if isinstance(e, UserError):
            raise
        raise UserError(f"the GGUF file's tokenizer is inconsistent ({e})") from None


def _load_tokenizer(metadata: dict) -> TokenizerWrapper:
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama") or tokens is None:
        raise UserError(f"GGUF tokenizer model {kind!r} is not supported (gpt2, llama)")
    token_types = metadata.get("tokenizer.ggml.token_type")
    token_types = token_types.tolist() if token_types is not None else [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}

    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
        tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        tokenizer.pre_tokenizer = _byte_level_pre_tokenizer(
            metadata.get("tokenizer.ggml.pre", "default")
        )
        tokenizer.decoder = decoders.ByteLevel()
        detokenizer_class = BPEStreamingDetokenizer
        add_bos_default = False
    else:
        scores = metadata["tokenizer.ggml.scores"].tolist()
        unk = tokens[_scalar(metadata, "tokenizer.ggml.unknown_token_id", 0)]
        tokenizer = Tokenizer(
            models.BPE(vocab, _spm_merges(vocab, scores), unk_token=unk,
                       fuse_unk=True, byte_fallback=True)
        )
        steps = [normalizers.Replace(" ", "\u2581")]
        if _scalar(metadata, "tokenizer.ggml.add_space_prefix", True):
            steps.insert(0, normalizers.Prepend("\u2581"))
        tokenizer.normalizer = normalizers.Sequence(steps)
        tokenizer.decoder = decoders.Sequence([
            decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ])
        detokenizer_class = SPMStreamingDetokenizer
        add_bos_default = True

    tokenizer.add_special_tokens([
        AddedToken(tokens[i], special=True, normalized=False)
        for i, t in enumerate(token_types) if t in (_CONTROL, _USER_DEFINED)
    ])

    special = {}
    for role in ("bos", "eos", "unknown", "padding"):
        token_id = _scalar(metadata, f"tokenizer.ggml.{role}_token_id")
        if token_id is not None and token_id < len(tokens):
            special[role] = tokens[token_id]
    if _scalar(metadata, "tokenizer.ggml.add_bos_token", add_bos_default) and "bos" in special:
        bos = special["bos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, vocab[bos])],
        )

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=special.get("bos"),
        eos_token=special.get("eos"),
        unk_token=special.get("unknown"),
        pad_token=special.get("padding"),
    )
    hf_tokenizer.chat_template = metadata.get("tokenizer.chat_template")
    # llama.cpp also stops at the end-of-turn token (Llama 3's <|eot_id|>).
    eos_ids = [
        _scalar(metadata, key) for key in ("tokenizer.ggml.eos_token_id",
                                           "tokenizer.ggml.eot_token_id")
        if _scalar(metadata, key) is not None
    ]
    return TokenizerWrapper(hf_tokenizer, detokenizer_class, eos_token_ids=eos_ids)
