"""The key grammar of LoRA files, shared by the UNet (:mod:`.lora`) and Flux (:mod:`.flux_lora`) checks."""

import re

# Key fragments that mark LoRA factors: peft (lora_A/lora_B), kohya (lora_down/lora_up), older diffusers
# attention-processor files (to_k_lora.down), and LoCon/LyCORIS' hada/lokr factors.
LORA_KEY = re.compile(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer|hada_w1|lokr_w1)")
# One factor of a low-rank pair, in every layout LORA_KEY names: group 1 is the factor; the key before it, the layer.
FACTOR = re.compile(r"[._](lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.down|"
                    r"lora_linear_layer\.up)(?:\.[^.]+)?\.weight$")
DOWN_FACTORS = ("lora_A", "lora_down", "lora.down", "lora_linear_layer.down")  # (rank, in): the first matmul
