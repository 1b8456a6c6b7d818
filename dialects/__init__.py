"""The dialect registry: one line per vendor API Dialgate speaks."""

from __future__ import annotations

from dialects.base import Dialect
from dialects.client import Client
from dialects.collect import Collect
from dialects.cohorly import Cohorly
from dialects.inslytic import Inslytic

REGISTRY: tuple[type[Dialect], ...] = (Cohorly, Client, Inslytic, Collect)
