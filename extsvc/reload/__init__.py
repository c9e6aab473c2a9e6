"""The reload layer: parse -> validate -> compile -> swap, above the three protocol packages.

:mod:`.compile` runs each protocol's compile step, :mod:`.runtime` holds the serving result
and swaps it atomically, :mod:`.provider` loads it from a watched file or the embedded demo.
"""
