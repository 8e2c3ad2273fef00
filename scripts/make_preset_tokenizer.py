"""Build the small byte-level BPE tokenizer shipped with the presets (nanovllm/presets/).

Presets have random weights, so any tokenizer serves; this one is trained on the Python standard
library's source so that text prompts work offline. Run once; the output is committed.
"""

import json
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parent.parent / "nanovllm" / "presets" / "tokenizer"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    # Qwen3's switch: enable_thinking=False (a chat_template_kwargs entry) pre-fills an empty thought
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def corpus():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in sorted(
        ["this.py", "textwrap.py", "argparse.py", "json/__init__.py", "dataclasses.py", "typing.py"]
    ):
        yield (stdlib / name).read_text()


def main() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    OUT.mkdir(exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "bos_token": None,
                "chat_template": CHAT_TEMPLATE,
                "model_max_length": 131072,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
