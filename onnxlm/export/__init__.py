"""Export: sources -> per-family PyTorch module -> ONNX -> validated bundle (needs the `export` extra).

`onnxlm.export(source, out_dir, **options)` is the public call. Python binds the name `onnxlm.export`
to this subpackage once any of its modules is imported, so the package itself is made callable.
"""

import sys
import types


class _CallablePackage(types.ModuleType):
    def __call__(self, source, out_dir, **options):
        from .convert import export

        return export(source, out_dir, **options)


sys.modules[__name__].__class__ = _CallablePackage
