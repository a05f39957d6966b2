"""The model store under ``$MOEINF_HOME`` (default ``~/.moeinf``): layout, manifests, pull."""
