"""Build the small byte-level BPE tokenizer shipped with the presets (nanovllm/presets/).

Presets have random weights, so any tokenizer serves; this one is trained on the Python standard
library's source so that text prompts work offline. Run once; the output is committed.
`--template-only` rewrites tokenizer_config.json (the chat template) and leaves the trained vocabulary.
"""

import json
import sys
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = Path(__file__).resolve().parent.parent / "nanovllm" / "presets" / "tokenizer"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    # Tools (OpenAI's function tools, LLM.chat's and the server's `tools`) come first, in a system turn that
    # also holds the conversation's own system message, in the Hermes format Qwen2.5 and Qwen3 use:
    # signatures in <tools>, calls in <tool_call>, results shown back in <tool_response>. Transformers
    # renders with trim_blocks, so a newline right after a tag is written as {{ nl }}.
    "{% set nl = '\\n' %}"
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{% endif %}"
    "# Tools\n\nThese functions may be called; their signatures are in <tools></tools>:\n<tools>"
    "{% for tool in tools %}{{ nl }}{{ tool | tojson }}{% endfor %}{{ nl }}</tools>\n\n"
    "To call one, answer with its name and arguments as a JSON object in <tool_call></tool_call> tags:\n"
    '<tool_call>\n{"name": <function name>, "arguments": <arguments object>}\n</tool_call><|im_end|>\n'
    "{% endif %}"
    "{% for m in messages %}"
    "{% if tools and loop.first and m['role'] == 'system' %}"  # (written in the tools turn)
    "{% elif m['role'] == 'tool' %}"  # consecutive results share one user turn
    "{% if loop.first or loop.previtem['role'] != 'tool' %}<|im_start|>user{% endif %}"
    "{{ nl }}<tool_response>\n{{ m['content'] }}\n</tool_response>"
    "{% if loop.last or loop.nextitem['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for call in m['tool_calls'] or [] %}"
    "{% if m['content'] or not loop.first %}{{ nl }}{% endif %}"
    "<tool_call>\n{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']}"
    " | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
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
    if "--template-only" not in sys.argv:
        train()
    write_config()


def train() -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    OUT.mkdir(exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))


def write_config() -> None:
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
