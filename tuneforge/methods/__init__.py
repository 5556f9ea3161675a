"""Fine-tuning methods: which parameters train.

A method is a plug point: it declares its options (a pydantic class validated from the
config's ``method:`` section), checks them against the model's module names before any
weights load, prepares the loaded model (wrap with peft, freeze, ...), and saves/loads
what it trained in the format users expect (a standard peft adapter folder for peft
methods). Objectives never need to know which method is in use.
"""

from tuneforge.methods.base import (
    METHODS,
    Method,
    PeftMethod,
    check_target_modules,
    count_trainable,
    get_method,
    methods_taking,
    register_method,
)

# Importing the families registers the built-in methods.
from tuneforge.methods import adapters as _adapters  # noqa: E402,F401
from tuneforge.methods import full as _full  # noqa: E402,F401
from tuneforge.methods import fusion as _fusion  # noqa: E402,F401
from tuneforge.methods import hft as _hft  # noqa: E402,F401
from tuneforge.methods import ia3 as _ia3  # noqa: E402,F401
from tuneforge.methods import lora as _lora  # noqa: E402,F401
from tuneforge.methods import prompt as _prompt  # noqa: E402,F401
from tuneforge.methods import qlora as _qlora  # noqa: E402,F401

__all__ = ["METHODS", "Method", "PeftMethod", "check_target_modules", "count_trainable", "get_method",
           "methods_taking", "register_method"]
