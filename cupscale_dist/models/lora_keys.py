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


def linear_layers(model_class, config: dict) -> dict[str, tuple[int, int] | None]:
    """Module path -> (in, out) features of every layer of the ``model_class`` that ``config`` describes (built on
    the meta device: no weights); None for a module that is not a Linear."""
    import torch

    with torch.device("meta"):
        model = model_class.from_config(config)
    return {name: ((module.in_features, module.out_features) if isinstance(module, torch.nn.Linear) else None)
            for name, module in model.named_modules() if name}


def check_layer_widths(factors, layers: dict, spec, what: str, kind: str) -> None:
    """One line for a LoRA factor (``factors``: (module path, factor name, shape) in diffusers' naming) of a layer
    the model lacks (``layers``: :func:`linear_layers`), or whose width is not the layer's (``kind``: the family's
    name in the refusal, 'Flux')."""
    for module, factor, shape in factors:
        if module not in layers:
            raise UserError(f"{what}: names a transformer layer {spec.name} does not have ({shown(module)}); "
                            "use a LoRA trained for this model")
        widths = layers[module]
        if widths is None or len(shape) < 2:
            continue
        down = factor in DOWN_FACTORS
        have, want = (shape[1], widths[0]) if down else (shape[0], widths[1])
        if have != want:
            raise UserError(f"{what}: its layer {shown(module)} has {have} {'inputs' if down else 'outputs'}, "
                            f"{spec.name}'s has {want}; the LoRA was trained for a {kind} model of other sizes")
