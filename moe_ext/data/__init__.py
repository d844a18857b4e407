"""Preference data shared by `train-pmol` and `train-rm`: TRL's formats (standard and
conversational, explicit or implicit prompt) from JSON Lines, JSON, Parquet or a
`datasets` folder or name, with a preference label column; tokenisation with any Hugging
Face tokenizer, its chat template and truncation.

  rows.py      PreferenceExample, the formats, row checks with file:line errors
  files.py     load_preferences: the sources
  tokenize.py  encode_example / encode_prompt: chat template, truncation
"""
from .files import load_preferences, read_rows
from .rows import PreferenceDataError, PreferenceExample, Text, extract_prompt, flatten, parse_row
from .tokenize import (EncodedExample, check_lengths, encode_example, encode_prompt,
                       encode_prompts_left_padded, uses_chat_template)

__all__ = ["PreferenceExample", "PreferenceDataError", "Text", "load_preferences", "read_rows", "parse_row",
           "extract_prompt", "flatten", "EncodedExample", "encode_example", "encode_prompt", "encode_prompts_left_padded",
           "uses_chat_template", "check_lengths"]
