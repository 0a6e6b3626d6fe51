"""Only here for cffi: the native engine is compiled from native/ at install time."""
from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
