"""The methods, one module each; importing the package registers them all in `METHODS`."""

from ..collect.steps import METHODS, Method, StepContext, get_method
from . import aura, circuit, project, scale, transport  # noqa: F401 - imported to register each method

__all__ = ["METHODS", "Method", "StepContext", "get_method"]
