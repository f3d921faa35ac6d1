"""Pytest plugin (``-p tests.hf.no_avx512bf16``) that makes bitsandbytes believe the CPU has no
AVX512-BF16, before it registers its CPU kernels: the native packed 4-bit kernel is then never
registered and every Linear4bit starts with ``support_avx512bf16_for_cpu = False``, as on such CPUs."""
import importlib.abc
import sys


class _PatchFunctional(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        loader = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return loader.create_module(spec)

            def exec_module(self, module):
                loader.exec_module(module)
                module.has_avx512bf16 = lambda: False

        spec.loader = Loader()
        return spec


assert "bitsandbytes" not in sys.modules, "load this plugin before bitsandbytes is imported"
sys.meta_path.insert(0, _PatchFunctional())
