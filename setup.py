"""The one thing pyproject.toml does not hold: the stream pump, a C extension (gateway/dataplane/_pump.c).

It is optional: where no C compiler is found the install still succeeds and every stream is relayed by the
Python path (`gateway serve --help`: --native-relay).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("gateway.dataplane._pump", ["gateway/dataplane/_pump.c"], optional=True)])
