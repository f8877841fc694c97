"""The key grammar of LoRA files and the checks every family's LoRA check shares (:mod:`.lora`, each family's
``check_lora``)."""

import re

from ..errors import UserError, shown

# Key fragments that mark LoRA factors: peft (lora_A/lora_B), kohya (lora_down/lora_up), older diffusers
# attention-processor files (to_k_lora.down), and LoCon/LyCORIS' hada/lokr factors.
LORA_KEY = re.compile(r"(lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer|hada_w1|lokr_w1)")
# One factor of a low-rank pair, in every layout LORA_KEY names: group 1 is the factor; the key before it, the layer.
FACTOR = re.compile(r"[._](lora_A|lora_B|lora_down|lora_up|lora\.down|lora\.up|lora_linear_layer\.down|"
                    r"lora_linear_layer\.up)(?:\.[^.]+)?\.weight$")
DOWN_FACTORS = ("lora_A", "lora_down", "lora.down", "lora_linear_layer.down")  # (rank, in): the first matmul


def factor_layers(header: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """Layer (the key before its factor) -> {'down'/'up': shape} for every low-rank factor in ``header``."""
    layers: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in header.items():
        match = FACTOR.search(key)
        if match:
            layers.setdefault(key[: match.start()], {})["down" if match[1] in DOWN_FACTORS else "up"] = shape
    return layers


def check_factor_pairs(header: dict, what: str) -> None:
    """Every layer has both factors of its pair (diffusers fails with an IndexError on a file of down factors only),
    and their ranks agree."""
    for layer, factors in sorted(factor_layers(header).items()):
        if len(factors) < 2:
            have, lack = ("down (lora_A)", "up (lora_B)") if "down" in factors else ("up (lora_B)", "down (lora_A)")
            raise UserError(f"{what}: layer {shown(layer)} has a {have} factor but no {lack} factor; the file is "
                            "incomplete: export the LoRA again")
        down, up = factors["down"], factors["up"]
        if len(down) < 2 or len(up) < 2 or down[0] != up[1]:
            raise UserError(f"{what}: the factors of layer {shown(layer)} do not fit together (down {shown(down, 30)}, "
                            f"up {shown(up, 30)}); "
                            "the file is damaged: export the LoRA again")
