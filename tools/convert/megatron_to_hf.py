"""Convert a sharded Megatron checkpoint (any TP/PP) to a Hugging Face directory.

python tools/convert/megatron_to_hf.py --megatron-dir DIR --output-dir DIR [--dtype bf16|fp32]
"""

import sys

from hpt_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["megatron-to-hf", *sys.argv[1:]]))
