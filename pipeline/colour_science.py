"""colour-science, imported without leaving stand-in modules behind: import it from here, never directly.

Without matplotlib installed, `import colour` puts `unittest.mock.MagicMock` objects into `sys.modules` as
`matplotlib`, `cycler` and `mpl_toolkits` (colour/plotting/__init__.py), so that its plotting module
imports. Any later import check in the process then finds a "matplotlib" without a `__spec__` and fails
(diffusers' `import_utils` raises ValueError at import). Previz uses none of colour's plotting, so the
stand-ins are taken out again right after the import (and its warnings about the missing optional
plotting and SciPy features are not shown).
"""

from __future__ import annotations

import sys
import warnings
from unittest.mock import MagicMock

_loaded = set(sys.modules)
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*related API features are not available")
    import colour
    from colour.algebra import table_interpolation_tetrahedral, table_interpolation_trilinear

for _name in set(sys.modules) - _loaded:
    if isinstance(sys.modules[_name], MagicMock):
        del sys.modules[_name]

__all__ = ["colour", "table_interpolation_tetrahedral", "table_interpolation_trilinear"]
