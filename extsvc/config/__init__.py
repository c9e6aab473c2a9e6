"""The config floor: the file's schema (:mod:`.model`) and the plugin-building helpers every
protocol's compile step shares (:mod:`.build`). Compiling, the runtime and reloading live in
:mod:`extsvc.reload`, above the protocols."""
