"""The reference zoo: a tiny base LM and full-parameter fine-tunes of it, built offline and deterministically."""

from .build import Zoo, ZooEntry, build_zoo, default_zoo_dir, load_zoo, missing_models
from .recipes import RECIPES, get_recipe
from .tasks import TASK_NAMES, Example, Task, fresh_examples, make_task

__all__ = [
    "RECIPES",
    "TASK_NAMES",
    "Example",
    "Task",
    "Zoo",
    "ZooEntry",
    "build_zoo",
    "default_zoo_dir",
    "fresh_examples",
    "get_recipe",
    "load_zoo",
    "make_task",
    "missing_models",
]
