"""The data: the catalogue (``catalogue.py``: interactions, the leave-one-out split, sampled
negatives and item images, behind ``load_catalogue``), the interaction readers
(``interactions.py``), image decoding (``images.py``) and the synthetic generator
(``synthetic.py``)."""
from vars_fast.data.catalogue import Catalogue, load_catalogue

__all__ = ["Catalogue", "load_catalogue"]
