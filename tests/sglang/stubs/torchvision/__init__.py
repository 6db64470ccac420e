"""A torchvision stand-in for the SGLang CPU tests only (never installed).

SGLang 0.5.23 imports torchvision at module level in its multimodal helpers,
which the radix-cache and scheduler modules pull in (and transformers then
imports ``torchvision.io`` & co. behind ``AutoProcessor``); PyPI torchvision
builds fail to load next to the CPU torch build ("operator torchvision::nms
does not exist"). tests/sglang/conftest.py puts this directory first on
sys.path. Every ``torchvision.*`` submodule imports, and every name in it is a
placeholder that raises when called, so a test that touches image code fails
loudly instead of computing something wrong.
"""

import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+kdn-test-stub"


class _Missing:
    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> "_Missing":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name}: torchvision is a test stand-in here (tests/sglang/stubs)")

    def __mro_entries__(self, bases):  # `class X(torchvision.something)` still defines X
        return (object,)

    def __repr__(self) -> str:
        return f"<torchvision stand-in {self._name}>"


class _StubModule(types.ModuleType):
    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Missing(f"{self.__name__}.{attr}")


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module) -> None:
        pass


sys.meta_path.append(_Finder())
sys.modules[__name__].__class__ = _StubModule
