"""Leaf utilities of the library: they import nothing of lordba but :mod:`lordba.errors`."""
