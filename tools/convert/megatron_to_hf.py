"""Convert a Megatron checkpoint (any TP/PP) to a Hugging Face directory: this project's sharded or
torch_dist format, or Megatron-LM's torch_dist / legacy mp_rank_XX[_YYY]/model_optim_rng.pt (detected).

python tools/convert/megatron_to_hf.py --megatron-dir DIR --output-dir DIR [--dtype bf16|fp32]
    [--hf-config HF_DIR_OR_CONFIG_JSON]   (Megatron-LM checkpoints carry no HF config)
"""

import sys

from hpt_megatron.convert.cli import main

if __name__ == "__main__":
    sys.exit(main(["megatron-to-hf", *sys.argv[1:]]))
