"""The price table as the engines import it (``from . import pricing``): the reader lives in
:mod:`gigafactory.schemas.pricing`, where the configuration can check ``GIGAFACTORY_PRICE_TABLE``
without importing the factory. New code imports it from there."""

from gigafactory.schemas.pricing import *  # noqa: F403  (exactly its __all__)
from gigafactory.schemas.pricing import __all__  # noqa: F401
