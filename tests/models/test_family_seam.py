"""One folder per family (issue 36): outside ``models/backbones/`` no code of the package branches on a family's name
or names a family's classes; it asks the family's Backbone (``backbone_class(spec.family)``) instead.

Read from the code itself (the syntax tree: comments and docstrings say what they like): a comparison with a
family's name (``family == "flux"``, ``spec.family in ("sdxl", "sd15")``, ``match``), a family's diffusers class
names (``FluxPipeline``, ``StableDiffusionXLPipeline``, ``FluxControlNetModel``, ...) as names or strings, and an
import of a family's folder (``models.backbones.flux``).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from cupscale_dist.models.backbones import BACKBONES

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "cupscale_dist"
BACKBONES_DIR = PACKAGE / "models" / "backbones"
# Not the method's code: tiny models of each family for the tests (testing/), and the trained demo model, an SDXL
# pipeline built for training (demo/train.py).
EXEMPT = (PACKAGE / "testing", PACKAGE / "demo")
FAMILIES = set(BACKBONES)  # 'sdxl', 'sd15', 'flux'
# A family's diffusers classes: its pipelines, transformer, ControlNet (the UNet families share UNet2DConditionModel
# and ControlNetModel: those name no family).
FAMILY_CLASS = re.compile(r"^(Flux\w*|StableDiffusion\w*)$")


def family_strings(node: ast.AST) -> list[str]:
    """The family names among a comparison operand's string constants (a tuple/list/set of them included)."""
    items = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return [item.value for item in items
            if isinstance(item, ast.Constant) and isinstance(item.value, str) and item.value in FAMILIES]


def family_branches(source: str) -> list[str]:
    """What in ``source`` branches on a family or names a family's class: '<line>: <what>' each."""
    found = []
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in [node.left, *node.comparators]:
                found += [f"{node.lineno}: compares with {name!r}" for name in family_strings(operand)]
        elif isinstance(node, ast.match_case):
            pattern = node.pattern
            if isinstance(pattern, ast.MatchValue):
                found += [f"{pattern.lineno}: matches {name!r}" for name in family_strings(pattern.value)]
        elif isinstance(node, ast.Name) and FAMILY_CLASS.match(node.id):
            found.append(f"{node.lineno}: names {node.id}")
        elif isinstance(node, ast.Attribute) and FAMILY_CLASS.match(node.attr):
            found.append(f"{node.lineno}: names {node.attr}")
        elif isinstance(node, ast.alias) and FAMILY_CLASS.match(node.name.split(".")[-1]):
            found.append(f"{node.lineno}: imports {node.name}")
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and FAMILY_CLASS.match(node.value)):
            found.append(f"{node.lineno}: names {node.value!r}")
        elif isinstance(node, ast.ImportFrom) and node.module and any(
                re.search(rf"(^|\.)backbones\.{name}(\.|$)", node.module) for name in FAMILIES):
            found.append(f"{node.lineno}: imports from {node.module}")
    return found


def outside_modules() -> list[Path]:
    """The package's modules outside models/backbones/ (and the exempt folders)."""
    return sorted(path for path in PACKAGE.rglob("*.py")
                  if BACKBONES_DIR not in path.parents and not any(folder in path.parents for folder in EXEMPT))


def test_no_code_outside_the_backbones_knows_a_family():
    problems = [f"{path.relative_to(ROOT)}:{line}" for path in outside_modules()
                for line in family_branches(path.read_text(encoding="utf-8"))]
    assert not problems, ("family branches outside models/backbones/ (ask backbone_class(spec.family) instead): "
                          + "; ".join(problems))


def test_the_check_sees_each_kind_of_family_branch():
    """Break-check: each kind of branch the test looks for is found, and what is allowed is not."""
    caught = {
        'if spec.family == "flux":\n    pass\n': "compares with 'flux'",
        'ok = family in ("sdxl", "sd15")\n': "compares with 'sdxl'",
        'ok = "sd15" != family\n': "compares with 'sd15'",
        'match family:\n    case "flux":\n        pass\n': "matches 'flux'",
        "from diffusers import FluxControlNetModel\n": "imports FluxControlNetModel",
        "cls = diffusers.StableDiffusionXLPipeline\n": "names StableDiffusionXLPipeline",
        'ok = name == "FluxControlNetModel"\n': "names 'FluxControlNetModel'",
        "from .backbones.flux.header import check_flux_file\n": "imports from backbones.flux.header",
        "from ..models.backbones.sdxl import SDXL\n": "imports from models.backbones.sdxl",
    }
    for source, what in caught.items():
        found = family_branches(source)
        assert any(what in line for line in found), (source, found)
    allowed = ('"""FluxPipeline\'s sigmas (a docstring)."""\n'
               "# family == 'flux' in a comment\n"
               "backbone = backbone_class(spec.family)\n"
               "from .models.backbones import backbone_class\n"
               'label = {768: "SD1.5"}\n'
               'what = f"{spec.family} model"\n')
    assert family_branches(allowed) == []
