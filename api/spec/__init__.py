"""The experiment spec, split by audience: see :mod:`xling.api.spec.base`."""
