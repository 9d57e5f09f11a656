"""Convert a Hugging Face checkpoint to a sharded Megatron checkpoint.

python tools/convert/hf_to_megatron.py --hf-dir DIR --output-dir DIR --tp N --pp N [--dtype bf16|fp32]
"""

import sys

from hpt_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["hf-to-megatron", *sys.argv[1:]]))
