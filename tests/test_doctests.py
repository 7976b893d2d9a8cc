"""The ``Examples`` sections of the library core run as doctests (issue 13, item 9)."""

import doctest
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

CORE = ["graph", "operator", "operator_sharded", "psi", "transform", "optimizers", "xla_workarounds"]


@pytest.mark.parametrize("name", CORE)
def test_doctests(name):
    module = importlib.import_module(f"sevo_jax.{name}")
    result = doctest.testmod(module, extraglobs={"np": np, "jnp": jnp, "jax": jax},
                             optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
                             raise_on_error=False, verbose=False)
    assert result.attempted > 0, f"sevo_jax.{name} has no examples"
    assert result.failed == 0, f"{result.failed} doctest(s) of sevo_jax.{name} failed (output above)"


@pytest.mark.parametrize("name", CORE)
def test_every_public_function_has_an_example(name):
    module = importlib.import_module(f"sevo_jax.{name}")
    missing = [n for n in module.__all__ if callable(getattr(module, n))
               and not isinstance(getattr(module, n), type)
               and "Examples:" not in (getattr(module, n).__doc__ or "")]
    assert not missing, f"sevo_jax.{name}: no Examples section in {missing}"
