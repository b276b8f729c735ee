"""``infinitrain recipes list | show NAME | cp NAME PATH``: the shipped recipes, to read or copy and edit."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import click

from infinitrain.cli_help import Group

from infinitrain.errors import ConfigError


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    path: Path
    model: str  # the preset name, or "custom"
    params: int  # of the first stage's model
    stages: tuple[str, ...]
    description: str


def _description(text: str, name: str) -> str:
    """The first comment line, without ``# NAME:``."""
    for line in text.splitlines():
        if line.startswith("#"):
            line = line.lstrip("#").strip()
            return line[len(name) + 1:].strip() if line.startswith(f"{name}:") else line
    return ""


def recipe_info(path: Path) -> RecipeInfo:
    from infinitrain.model.lm import count_parameters
    from infinitrain.train.config import load_recipe, load_yaml, recipe_stages

    raw = load_yaml(path)
    m = raw.get("model")
    model = m if isinstance(m, str) else (m.get("preset") or "custom") + ("" if "preset" not in m or len(m) == 1
                                                                         else " (edited)")
    cfg = load_recipe(str(path))
    return RecipeInfo(path.stem, path, model, count_parameters(cfg.model), tuple(recipe_stages(raw, str(path))),
                      _description(path.read_text(), path.stem))


def list_recipes() -> list[RecipeInfo]:
    from infinitrain.train.config import shipped_recipes

    return [recipe_info(p) for p in shipped_recipes()]


def _shipped(name: str) -> Path:
    from infinitrain.train.config import RECIPE_DIR, shipped_recipes

    path = RECIPE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name!r} (shipped: {', '.join(p.stem for p in shipped_recipes())})")
    return path


def copy_recipe(name: str, dest: str | Path, force: bool = False) -> Path:
    """Copy a shipped recipe to DEST (a file, or a folder to hold NAME.yaml); never overwrites without ``force``."""
    src = _shipped(name)
    out = Path(dest)
    if out.is_dir():
        out = out / src.name
    if out.exists() and not force:
        raise ConfigError(f"{out}: already exists (pass --force to overwrite)")
    if not out.parent.is_dir():
        raise ConfigError(f"{out.parent}: no such directory")
    shutil.copyfile(src, out)
    return out


@click.group("recipes", cls=Group)
def recipes_group() -> None:
    """Shipped training recipes: list them, print one, copy one to edit."""


@recipes_group.command("list")
def list_cmd() -> None:
    """Name, model, parameters, stages and what each recipe is for."""
    rows = list_recipes()
    width = max(len(r.name) for r in rows)
    mwidth = max(len(r.model) for r in rows)
    for r in rows:
        stages = ",".join(r.stages) or "-"
        size = f"{r.params / 1e9:7.3f} B" if r.params >= 1e9 else f"{r.params / 1e6:7.2f} M"
        click.echo(f"{r.name:{width}s}  {r.model:{mwidth}s}  {size}  {stages:17s}  {r.description}")


@recipes_group.command("show")
@click.argument("name")
@click.option("--resolved", is_flag=True, help="Print the resolved config instead (every default filled in), as "
              "the run dir's config.yaml will hold it.")
@click.option("--stage", default=None, help="With --resolved: this stage (default: the first one).")
def show_cmd(name: str, resolved: bool, stage: str | None) -> None:
    """Print the recipe's YAML (comments included)."""
    path = _shipped(name)
    if not resolved:
        if stage is not None:
            raise ConfigError("--stage needs --resolved (the file holds every stage)")
        click.echo(path.read_text(), nl=False)
        return
    import yaml

    from infinitrain.train.config import load_recipe

    click.echo(yaml.safe_dump(load_recipe(str(path), stage=stage).to_dict(), sort_keys=False), nl=False)


@recipes_group.command("cp")
@click.argument("name")
@click.argument("dest")
@click.option("--force", is_flag=True, help="Overwrite DEST if it exists.")
def cp_cmd(name: str, dest: str, force: bool) -> None:
    """Copy recipe NAME to DEST (a .yaml path or a folder); then `infinitrain train --recipe DEST`."""
    out = copy_recipe(name, dest, force)
    click.echo(f"wrote {out}")
