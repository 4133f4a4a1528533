"""The method table: every training method ``algorithm:`` may name, registered here and only here.

The run config's allowed values (policy_trainer.config), ``salmon train --algorithm`` and
``salmon demo --algorithm`` all read this table, so a method registered here is offered
everywhere. Adding one (policy_trainer.methods.base says what ``build`` gets and returns)::

    # policy_trainer/methods/toy.py
    def build(ctx: BuildContext) -> Trainer: ...
    METHOD = Method(name="toy", summary="...", build=build, uses_reward_service=False)

    # here: import toy and add toy.METHOD to BUILTIN

A method with settings of its own also names its section (``section="ppo", settings=PPOSettings``);
that section is a field of the same name and model in policy_trainer.config.RunConfig (a test
checks the two agree). A method registered at run time (``register``) is offered the same way.
"""

from __future__ import annotations

from policy_trainer.methods import dno, grpo, ppo, rloo, sami, savi, sft
from policy_trainer.methods.base import BuildContext, Method, Trainer
from salmon.errors import UserError

__all__ = ["BUILTIN", "BuildContext", "Method", "Trainer", "get_method", "method_names", "methods", "register",
           "unregister"]

BUILTIN: tuple[Method, ...] = (grpo.METHOD, rloo.METHOD, ppo.METHOD, sami.METHOD, dno.METHOD, savi.METHOD,
                              sft.METHOD)

_TABLE: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the table; a name already taken is an error (unregister it first)."""
    if method.name in _TABLE:
        raise ValueError(f"method {method.name!r} is already registered")
    _TABLE[method.name] = method
    return method


def unregister(name: str) -> None:
    del _TABLE[name]


def method_names() -> list[str]:
    """Registered names, in registration order (the built-in ones first)."""
    return list(_TABLE)


def methods() -> list[Method]:
    return list(_TABLE.values())


def get_method(name: str) -> Method:
    try:
        return _TABLE[name]
    except KeyError:
        raise UserError(f"algorithm: {name!r} is not a registered method; choose one of: "
                        f"{', '.join(_TABLE)}") from None


for _method in BUILTIN:
    register(_method)
