"""fersearch: hyperparameter search for facial-expression recognition on FERPlus.

Data flows one way: data -> models -> engine -> training -> trainable -> search -> tracking/export.
"""

__version__ = "0.1.0"
