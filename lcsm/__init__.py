"""lcsm: linear-complexity sequence models as Expand, Oscillation, Shrink.

`from lcsm import Model` is the model (lcsm/nn/model.py); it is imported on first use, so that
`import lcsm.config` and the command line start without building the model layer.

`import lcsm` also teaches Hugging Face transformers' AutoConfig / AutoModelForCausalLM the lcsm
model (lcsm/hf.py) — without importing transformers: if it is imported already, at once; else the
moment it is imported (a one-shot import hook). `import lcsm.hf` registers explicitly.
"""

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"
__all__ = ["Model", "__version__"]


def __getattr__(name):
    if name == "Model":
        from lcsm.nn.model import Model

        return Model
    raise AttributeError(f"module 'lcsm' has no attribute {name!r}")


def _register_hf() -> None:
    try:
        import lcsm.hf  # noqa: F401  (registers on import)
    except Exception as e:  # an incompatible transformers must not break the program that imported it
        import warnings

        warnings.warn(f"lcsm: could not register with transformers ({type(e).__name__}: {e})", stacklevel=2)


class _OnTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when `transformers` is first imported, runs the real import, then registers."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers":
            return None
        sys.meta_path.remove(self)  # once, and no recursion into this finder below
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _register_hf()

        spec.loader.exec_module = exec_module
        return spec


if "transformers" in sys.modules:
    _register_hf()
elif not any(isinstance(f, _OnTransformersImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _OnTransformersImport())
