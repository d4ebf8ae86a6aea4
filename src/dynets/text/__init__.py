"""Dynamic text models: Dynamic BERT (an exit after every encoder layer) and text tables.

transformers is needed only to build or load a DynamicBert (pip install dynets[text]); importing
this package does not import it.
"""

from dynets.text.bert import DynamicBert, DynamicBertConfig, ExitHead
from dynets.text.bert_costs import LengthCost, fit_length_cost
from dynets.text.data import TextDataset, TextTable, encode_table, load_text_table
from dynets.text.recipes import RECIPES, train_text

__all__ = [
    "RECIPES",
    "DynamicBert",
    "DynamicBertConfig",
    "ExitHead",
    "LengthCost",
    "TextDataset",
    "TextTable",
    "encode_table",
    "fit_length_cost",
    "load_text_table",
    "train_text",
]
