"""Dynamic text models: Dynamic BERT (an exit after every encoder layer, with DynaBERT width and
depth sub-networks) and text tables.

transformers is needed only to build or load a DynamicBert (pip install dynets[text]); importing
this package does not import it.
"""

from dynets.text.bert import DynamicBert, DynamicBertConfig, ExitHead
from dynets.text.bert_costs import LengthCost, fit_length_cost
from dynets.text.data import TextDataset, TextTable, encode_table, load_text_table
from dynets.text.dynabert import (
    DEPTHS,
    WIDTHS,
    Rewiring,
    estimate_importance,
    kept_layers,
    rewire,
    train_dynabert,
)
from dynets.text.recipes import RECIPES, train_text

__all__ = [
    "DEPTHS",
    "RECIPES",
    "WIDTHS",
    "DynamicBert",
    "DynamicBertConfig",
    "ExitHead",
    "LengthCost",
    "Rewiring",
    "TextDataset",
    "TextTable",
    "encode_table",
    "estimate_importance",
    "fit_length_cost",
    "kept_layers",
    "load_text_table",
    "rewire",
    "train_dynabert",
    "train_text",
]
