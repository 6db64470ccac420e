"""Package list for setuptools (everything else is in pyproject.toml).

``kernels/`` and ``integrations/`` sit at the top of the repository and install as
``kdn_hf.kernels`` and ``kdn_hf.integrations``: the mapping below is the only place that says so,
and the package list is derived from the folders, so a new subpackage needs no edit here.
"""

from setuptools import find_packages, setup

MAPPED = {"kdn_hf.kernels": "kernels", "kdn_hf.integrations": "integrations"}

packages = find_packages(include=["kdn_hf", "kdn_hf.*"])
for name, folder in MAPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_packages(where=folder)]

setup(packages=packages, package_dir=MAPPED)
