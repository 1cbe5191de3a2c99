"""lcsm: linear-complexity sequence models as Expand, Oscillation, Shrink.

`from lcsm import Model` is the model (lcsm/nn/model.py); it is imported on first use, so that
`import lcsm.config` and the command line start without building the model layer.
"""

__version__ = "0.1.0"
__all__ = ["Model", "__version__"]


def __getattr__(name):
    if name == "Model":
        from lcsm.nn.model import Model

        return Model
    raise AttributeError(f"module 'lcsm' has no attribute {name!r}")
