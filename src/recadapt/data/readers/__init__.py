"""Dataset readers: one module per source, each returning a validated :class:`recadapt.data.schema.Dataset`.

Readers only read: they never write files, and bad input raises :class:`recadapt.errors.DataFormatError`
naming the file, the 1-based line (for Parquet, the 1-based row) and the field.
"""

from recadapt.data.readers.amazon import read_amazon2018
from recadapt.data.readers.collm import read_collm_ml1m
from recadapt.data.readers.lastfm import read_lastfm
from recadapt.data.readers.llara import read_movielens_llara_test, read_steam_llara_test
from recadapt.data.readers.ml100k import read_ml100k
from recadapt.data.readers.movielens import read_ml1m, read_ml10m, read_ml20m, read_ml25m
from recadapt.data.readers.recbole import read_recbole

__all__ = [
    "read_amazon2018",
    "read_collm_ml1m",
    "read_lastfm",
    "read_ml100k",
    "read_ml10m",
    "read_ml1m",
    "read_ml20m",
    "read_ml25m",
    "read_movielens_llara_test",
    "read_recbole",
    "read_steam_llara_test",
]
