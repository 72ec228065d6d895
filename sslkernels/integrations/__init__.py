"""Patches that swap sslkernels' drop-in classes into other libraries' namespaces.

One submodule per library (``sslkernels.integrations.lightly`` ...), each with ``patch()`` / ``unpatch()``.
Nothing here imports those libraries: a submodule imports its library only when ``patch()`` runs, so
``import sslkernels`` never pulls them in.
"""
