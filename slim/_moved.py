"""Old module paths, from before the package was laid out by stage, still import.

`import slim.interventions`, `from slim.generation import answer_questions` and `python -m slim.reports`
keep working: a finder on `sys.meta_path` answers each old name with its new module (one new module: that
module itself; several: a module that reads its names from them in order), with a DeprecationWarning naming
the new path. New code should import from the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

__all__ = ["MOVED"]

# old module -> the module(s) its names now live in
MOVED: dict[str, tuple[str, ...]] = {
    "slim.activations": ("slim.data.activations",),
    "slim.heads": ("slim.models.heads",),
    "slim.probes": ("slim.stage1.probes",),
    "slim.losses": ("slim.stage1.losses",),
    "slim.detector": ("slim.stage1.detector",),
    "slim.interventions": ("slim.policies.base", "slim.policies.slim", "slim.policies.iti", "slim.policies.mimic"),
    "slim.gaussian_ot": ("slim.policies.gaussian_ot", "slim.policies.head_maps"),
    "slim.linear_act": ("slim.policies.linear_act",),
    "slim.mixed": ("slim.policies.mixed",),
    "slim.fit": ("slim.policies.fit",),
    "slim.generation": ("slim.answering.prompts", "slim.answering.decoding", "slim.answering.answers"),
    "slim.prefix": ("slim.answering.prefix",),
    "slim.likelihood": ("slim.answering.likelihood",),
    "slim.metrics": ("slim.evaluation.metrics", "slim.models.embedder"),
    "slim.sweep": ("slim.evaluation.sweep",),
    "slim.reports": ("slim.evaluation.reports",),
    "slim.figures": ("slim.paper.figures",),
    "slim.examples": ("slim.paper.examples",),
    "slim.timing": ("slim.paper.timing", "slim.paper.overhead", "slim.paper.table4"),
    "slim.transfer": ("slim.paper.nq_open", "slim.paper.transfer"),
    "slim.audit": ("slim.judges.audit",),
}


class _Loader(importlib.abc.Loader):
    def __init__(self, old: str, new: tuple[str, ...]):
        self.old, self.new = old, new

    def create_module(self, spec):
        warnings.warn(f"{self.old} moved to {' / '.join(self.new)}; import it from there.", DeprecationWarning, 3)
        if len(self.new) == 1:
            return importlib.import_module(self.new[0])  # the new module itself, under its old name too
        parts = [importlib.import_module(n) for n in self.new]
        module = types.ModuleType(self.old, f"Moved to {', '.join(self.new)}.")

        def __getattr__(name):
            for part in parts:
                if hasattr(part, name):
                    return getattr(part, name)
            raise AttributeError(f"module {self.old!r} has no attribute {name!r} (it moved to {', '.join(self.new)})")

        module.__getattr__ = __getattr__
        module.__all__ = [n for p in parts for n in getattr(p, "__all__", [k for k in vars(p) if k[0] != "_"])]
        return module

    def exec_module(self, module):
        pass

    def get_code(self, name):  # `python -m <old name>` runs the new module (one-module moves only)
        if len(self.new) != 1:
            raise ImportError(f"{self.old} moved to {', '.join(self.new)}: run one of those with -m.")
        source = f"import runpy\nrunpy.run_module({self.new[0]!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{self.old}, moved to {self.new[0]}>", "exec")

    def is_package(self, name):
        return False


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        new = MOVED.get(name)
        if new is None:
            return None
        origin = importlib.util.find_spec(new[0]).origin if len(new) == 1 else None  # runpy's sys.argv[0]
        return importlib.util.spec_from_loader(name, _Loader(name, new), origin=origin)


if not any(isinstance(f, _Finder) for f in sys.meta_path):
    sys.meta_path.append(_Finder())
