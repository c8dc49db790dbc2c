"""The ``tenki`` command line, built on the SDK (:mod:`tenkibox.client`)."""
