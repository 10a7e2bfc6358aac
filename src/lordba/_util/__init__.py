"""Leaf utilities of the library: they import nothing of lordba but :mod:`lordba.errors` and each other
(and only torch and the standard library outside it)."""
