"""The task registry: ``get_task(name)``, ``list_tasks()`` and ``register(task)``."""

from __future__ import annotations

from fedsea.errors import InvalidInputError
from fedsea.tasks.base import Task
from fedsea.tasks.qa import QA_TASKS
from fedsea.tasks.superglue import SUPERGLUE_TASKS
from fedsea.tasks.text import TEXT_TASKS

_TASKS: dict[str, Task] = {}


def register(task: Task, replace: bool = False) -> Task:
    """Add ``task`` to the registry (``replace=True`` to override a task of the same name)."""
    if task.name in _TASKS and not replace:
        raise InvalidInputError("task", f"a task named {task.name!r} is already registered")
    _TASKS[task.name] = task
    return task


def get_task(name: str | Task) -> Task:
    """The registered task called ``name`` (a ``Task`` is returned as it is)."""
    if isinstance(name, Task):
        return name
    try:
        return _TASKS[name]
    except KeyError:
        raise InvalidInputError("task", f"unknown task {name!r}; known tasks: {', '.join(list_tasks())}") from None


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(_TASKS)


for _task in (*TEXT_TASKS, *SUPERGLUE_TASKS, *QA_TASKS):
    register(_task)
