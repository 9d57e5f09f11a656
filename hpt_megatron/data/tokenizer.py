"""The project's own tokenizer for the synthetic task, built locally and saved in Hugging Face format.

Design: a word-level vocabulary over the task's lexicon (each word with and without a leading space),
with every printable ASCII character as a fallback token, so any ASCII text encodes and decodes back
exactly. Digits are always single tokens, so a number is spelled digit by digit and a tiny model
learns the arithmetic on ten symbols. ``\\boxed{12}`` becomes ``\\``, ``boxed``, ``{``, ``1``, ``2``,
``}``: the answer format takes several specific tokens, which a random policy does not stumble on.

Chat markers follow the ChatML style (``<|im_start|>role\\n...<|im_end|>\\n``); ``<|im_end|>`` is the
EOS token, so a demonstration + EOS is exactly the assistant turn of the chat template.

    python -m hpt_megatron.data.tokenizer --out DIR
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from hpt_megatron.data.synthetic import lexicon

PAD, UNK, EOT, IM_START, IM_END = "<|pad|>", "<|unk|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, UNK, EOT, IM_START, IM_END)
EOS = IM_END
# Words of the chat roles and of the prompts templates.py can add (Qwen's math system prompt, the
# Llama base template), so those encode as words rather than letter by letter.
TEMPLATE_WORDS = (
    "system",
    "user",
    "assistant",
    "Question",
    "Answer",
    "Let",
    "think",
    "step",
    "by",
    "Please",
    "reason",
    "and",
    "put",
    "your",
    "final",
    "answer",
    "within",
)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MODEL_MAX_LENGTH = 512


def vocabulary_words() -> list[str]:
    """The multi-letter words that get their own tokens (sorted, so ids are stable)."""
    return sorted({w for w in (*lexicon(), *TEMPLATE_WORDS) if len(w) > 1})


def _characters() -> list[str]:
    return sorted(set(string.printable))


def build_vocab() -> dict[str, int]:
    """Special tokens, then single characters, then words, then words with a leading space."""
    words = vocabulary_words()
    tokens = [*SPECIAL_TOKENS, *_characters(), *words, *(" " + w for w in words)]
    return {token: i for i, token in enumerate(tokens)}


def _split_pattern(words: Sequence[str]) -> str:
    # A lexicon word (optionally with its leading space) only at word boundaries; anything else, one
    # character at a time. Longest words first so a word never matches as a prefix of a longer one.
    alternatives = "|".join(sorted(words, key=lambda w: (-len(w), w)))
    return rf" ?\b(?:{alternatives})\b|[\s\S]"


def build_tokenizer() -> Tokenizer:
    """The ``tokenizers`` object (special tokens registered; no BOS is added on encode)."""
    tokenizer = Tokenizer(models.WordLevel(vocab=build_vocab(), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(
        Regex(_split_pattern(vocabulary_words())), behavior="isolated"
    )
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [EOT, IM_START],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": MODEL_MAX_LENGTH,
        "padding_side": "left",
    }


def save_tokenizer(out: str | Path) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    config = _tokenizer_config(tokenizer)
    special_map = {
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [EOT, IM_START],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write the synthetic task's tokenizer in Hugging Face format."
    )
    parser.add_argument("--out", required=True, help="output folder")
    out = save_tokenizer(parser.parse_args(argv).out)
    print(f"wrote tokenizer ({build_tokenizer().get_vocab_size()} tokens) to {out}")


if __name__ == "__main__":
    main()


# Newlines, digits, a boxed answer and chat words: where a rebuilt tokenizer tends to differ.
_TOKENIZER_PROBE = "<|im_start|>assistant\nQuestion:\nLet's think step by step.\n\\boxed{12} 3.5\n"


def encodes_like_file(tokenizer, tokenizer_json: Path) -> bool:
    """Whether ``tokenizer`` encodes like the ``tokenizer.json`` saved with the model."""
    saved = Tokenizer.from_file(str(tokenizer_json)).encode(_TOKENIZER_PROBE, add_special_tokens=False).ids
    return tokenizer(_TOKENIZER_PROBE, add_special_tokens=False)["input_ids"] == saved


def load_hf_tokenizer(source: str | Path):
    """``AutoTokenizer.from_pretrained(source)``, unless it encodes unlike the saved tokenizer.json.

    transformers picks the tokenizer class from config.json's model type and may rebuild the saved
    tokenizer.json with that family's pre-tokenizer (a qwen2 config turns this project's synthetic
    tokenizer into Qwen2Tokenizer, which encodes differently). Prompts must be encoded as in training,
    so then the file is loaded as it is, with a warning.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    source = Path(source)
    tokenizer = AutoTokenizer.from_pretrained(source)
    saved = source / "tokenizer.json"
    if saved.is_file() and not encodes_like_file(tokenizer, saved):
        print(
            f"warning: {type(tokenizer).__name__} (chosen by transformers for this model type) does not "
            f"encode like {saved}; using the file as saved",
            file=sys.stderr,
        )
        tokenizer = PreTrainedTokenizerFast.from_pretrained(source)
    return tokenizer
