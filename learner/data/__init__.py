"""The data layer: read datasets into unified Samples, split and blend them across the three steps,
tokenize them (with an on-disk cache) and collate batches."""

from learner.data.collate import CausalLMCollator, PairCollator, PromptCollator
from learner.data.load import DataReport, LoadedDataset, load_dataset, parse_spec
from learner.data.sample import Sample
from learner.data.split import hold_out, split_for_steps
from learner.data.tokenized import PairDataset, PromptDataset, SFTDataset, TextDataset

__all__ = ["Sample", "DataReport", "LoadedDataset", "load_dataset", "parse_spec", "split_for_steps", "hold_out",
           "SFTDataset", "PairDataset", "PromptDataset", "TextDataset",
           "CausalLMCollator", "PairCollator", "PromptCollator"]
