"""Stand-in for matplotlib on the GPU machine (scripts/gpu_wheelhouse.sh): mmdet's visualisation
module imports it (and `matplotlib.pyplot`, `.collections`, `.patches`) at import time; the
model comparisons never draw. Every submodule resolves to a stub whose attributes raise when
called. Only on sys.path when the real matplotlib is absent."""
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0-stub"


class _Missing(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def missing(*a, **k):
            raise NotImplementedError(f"{self.__name__}.{name}: matplotlib is not installed (import stub)")

        return missing


class _Submodules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        return _Missing(spec.name)

    def exec_module(self, module):
        module.__path__ = []


sys.meta_path.insert(0, _Submodules())


def use(*a, **k):
    return None
