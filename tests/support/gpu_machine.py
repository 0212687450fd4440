"""A sitecustomize that makes this interpreter look like one of the GPU machines: only torch, transformers,
peft, triton and what they require are installed, and never diffusers nor pydantic; every other installed
distribution (pillow, ...) is hidden too: site-packages is replaced by a folder of links to the allowed
distributions' files, as in a clean virtualenv, so what the probe imports must come from the checkout or
from its --wheels folder.

tests/test_gpu_probe.py writes SITECUSTOMIZE into a folder put on PYTHONPATH of a subprocess.
"""

from __future__ import annotations

SITECUSTOMIZE = r'''
import atexit
import importlib.metadata as metadata
import os
import re
import shutil
import sys
import tempfile

GPU_IMAGE = ("torch", "transformers", "peft", "triton")
# The GPU machines have neither, though typer (a transformers requirement) needs pydantic here.
ABSENT = {"diffusers", "pydantic", "pydantic-core"}


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots):
    """The distributions `roots` require, transitively (extras left out, markers taken as true)."""
    seen, todo = set(), [_canonical(root) for root in roots]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            if "extra ==" not in requirement:
                todo.append(_canonical(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0]))
    return seen


def _gpu_machine_site(site):
    """A folder of links to the entries of `site` that the allowed distributions installed."""
    allowed = _closure(GPU_IMAGE) - ABSENT
    kept, hidden = set(), set()
    for distribution in metadata.distributions(path=[site]):
        entries = {f.parts[0] for f in distribution.files or [] if f.parts and f.parts[0] != ".."}
        (kept if _canonical(distribution.metadata["Name"]) in allowed else hidden).update(entries)
    view = tempfile.mkdtemp(prefix="gpu-machine-site-")
    atexit.register(shutil.rmtree, view, True)
    for entry in os.listdir(site):
        if entry not in hidden - kept and not entry.endswith(".pth"):
            os.symlink(os.path.join(site, entry), os.path.join(view, entry))
    return view


sys.path[:] = [_gpu_machine_site(p) if p.endswith("site-packages") else p for p in sys.path]
# the editable install of Previz (a .pth hook, run before this file) must not serve the checkout's packages
sys.meta_path[:] = [finder for finder in sys.meta_path if "__editable__" not in repr(finder)]
'''
