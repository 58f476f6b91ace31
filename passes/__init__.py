"""FX graph passes of the ``qexport`` compile back-end (installed as ``qexport.passes``)."""
